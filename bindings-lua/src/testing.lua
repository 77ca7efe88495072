-- vmcore.testing: helpers for busted specs that boot guests and assert on them. Failures are
-- Lua errors (raised at the caller's level) whose message ends with the VM's console tail, so a
-- failing spec shows what the guest printed.
--
--   local testing = require("vmcore.testing")
--   local vm <close> = testing.boot{kernel = "mb-smp.elf", vcpus = 2, timeout = 30}
--   testing.expect(vm, "all 2 cpus up")
--   testing.assert_outcome(vm, "debug_exit", {code = 0x22})

local vmcore = require("vmcore")

local M = {}

local function tail(vm)
  local ok, text = pcall(function() return vm.console:tail() end)
  return ok and text or "(console unavailable)"
end

local function fail(vm, message)
  error(message .. "\n--- console tail ---\n" .. tail(vm), 3)
end

-- console:expect's own errors already end with the console tail.
local function fail_expect(message)
  error(message, 3)
end

--- Builds a VM, loads `opts.kernel` and starts it. Options: kernel (a path), flat ("real",
--- "protected" or "long": load a flat binary), address, cmdline, modules, memory, vcpus,
--- precise, timeout (seconds; default 30). Returns the running VM.
function M.boot(opts)
  assert(type(opts) == "table" and opts.kernel, "vmcore.testing.boot needs {kernel = path, ...}")
  local vm = vmcore.Vm{memory = opts.memory or "64M", vcpus = opts.vcpus, precise = opts.precise}
  if opts.flat then
    local f = assert(io.open(opts.kernel, "rb"))
    local code = f:read("a")
    f:close()
    vm:load_flat(code, {address = opts.address, mode = opts.flat})
  else
    vm:load_kernel(opts.kernel, {cmdline = opts.cmdline, modules = opts.modules})
  end
  vm:start{timeout = opts.timeout or 30}
  return vm
end

--- Waits for `pattern` (a Rust regex, as console:expect takes) on the console (default 10 s);
--- returns the match. On failure raises an error naming the pattern, with the console tail.
function M.expect(vm, pattern, timeout)
  local ok, result = pcall(vm.console.expect, vm.console, pattern, timeout or 10)
  if not ok then
    fail_expect("expected " .. string.format("%q", pattern) .. " on the console: " .. tostring(result))
  end
  return result
end

--- Waits for the run to end (default 30 s) and checks its reason and, when given, its code.
--- Returns the outcome.
function M.assert_outcome(vm, reason, opts)
  opts = opts or {}
  local out = vm:wait(opts.timeout or 30)
  if out == nil then
    fail(vm, "expected outcome " .. reason .. ", but the VM was still running")
  end
  if out.reason ~= reason or (opts.code ~= nil and out.code ~= opts.code) then
    local wanted = reason .. (opts.code and string.format(" code=0x%x", opts.code) or "")
    fail(vm, "expected outcome " .. wanted .. ", got " .. tostring(out))
  end
  return out
end

return M
