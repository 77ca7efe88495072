-- Shared set-up for the Lua binding's busted specs: builds target/lua/vmcore.so with
-- scripts/build-lua and puts it on package.cpath, builds the test guests into target/guests/
-- (make, once per run: a no-op when they are current), reads them and looks up their symbols.

local helper = {}

-- The repo root, from this file's own path (tests/lua/helper.lua), so specs work from any cwd
-- that finds this file.
local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
helper.root = here .. "/../.."
helper.guest_dir = helper.root .. "/target/guests"

local function exists(path)
  local f = io.open(path, "rb")
  if f then
    f:close()
  end
  return f ~= nil
end

-- Quotes a string for sh.
local function shell_quote(s)
  return "'" .. s:gsub("'", [['\'']]) .. "'"
end

local function run(command)
  local ok, how, code = os.execute(command)
  assert(ok, ("%s failed (%s %s)"):format(command, how, code))
end

-- (Re)build the module once per run, so the specs never test a stale vmcore.so; cargo makes this
-- a no-op when nothing changed. It keeps the profile of the last scripts/build-lua (debug unless
-- that was --release). Its output is shown only if the build fails.
do
  local flags = ""
  local f = io.open(helper.root .. "/target/lua/vmcore.profile", "r")
  if f then
    if f:read("l") == "release" then
      flags = " --release"
    end
    f:close()
  end
  local log = os.tmpname()
  local ok = os.execute(shell_quote(helper.root .. "/scripts/build-lua") .. flags .. " >" .. shell_quote(log) .. " 2>&1")
  if not ok then
    local f = io.open(log, "r")
    io.stderr:write(f and f:read("a") or "")
    if f then
      f:close()
    end
  end
  os.remove(log)
  assert(ok, "scripts/build-lua failed (output above)")
end
package.cpath = helper.root .. "/target/lua/?.so;" .. package.cpath
helper.vmcore = require("vmcore")

-- All guests are built together by tests/guests/Makefile. make runs once per run, so a guest
-- whose source changed is rebuilt rather than tested stale.
local built = false
local function ensure_guests()
  if built then
    return
  end
  run("make -s -C " .. shell_quote(helper.root .. "/tests/guests"))
  built = true
end

--- The path of a built guest.
function helper.guest_path(name)
  ensure_guests()
  local path = helper.guest_dir .. "/" .. name
  assert(exists(path), "guest " .. name .. " was not built (looked for " .. path .. ")")
  return path
end

--- The bytes of a built guest.
function helper.guest(name)
  local f = assert(io.open(helper.guest_path(name), "rb"))
  local data = f:read("a")
  f:close()
  return data
end

--- The address of a global label in a guest ELF (from binutils' nm).
function helper.symbol(name, symbol)
  local p = assert(io.popen("nm " .. shell_quote(helper.guest_path(name))))
  local address
  for line in p:lines() do
    local hex, sym = line:match("^(%x+) %a (%S+)$")
    if sym == symbol then
      address = tonumber(hex, 16)
    end
  end
  p:close()
  return assert(address, name .. " has no symbol " .. symbol)
end

--- Writes `data` to a new temporary file and returns its path (removed by helper.cleanup()).
local temporaries = {}
function helper.temp_file(data)
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
  temporaries[#temporaries + 1] = path
  return path
end

function helper.cleanup()
  for i, path in ipairs(temporaries) do
    os.remove(path)
    temporaries[i] = nil
  end
end

--- A new VM with `code` loaded flat (defaults: 0x100000, long mode).
function helper.flat_vm(name, opts, vm_opts)
  local vm = helper.vmcore.Vm(vm_opts or { memory = "64M" })
  vm:load_flat(helper.guest(name), opts)
  return vm
end

--- Calls f(...) expecting it to raise; returns the error, checked to be a string.
function helper.error_of(f, ...)
  local ok, err = pcall(f, ...)
  assert(not ok, "expected an error, got success")
  assert(type(err) == "string", "expected a string error, got a " .. type(err))
  return err
end

-- This Lua process's own pid: /proc/self read with io.open is the Lua process itself (io.popen
-- would start another process, whose /proc/self is not ours).
local function own_pid()
  local f = assert(io.open("/proc/self/stat", "r"))
  local stat = f:read("l")
  f:close()
  return assert(tonumber(stat:match("^(%d+)")))
end
helper.pid = own_pid()

local function count_entries(dir)
  local p = assert(io.popen("ls " .. shell_quote(dir) .. " | wc -l"))
  local n = tonumber(p:read("a"):match("%d+"))
  p:close()
  return n
end

-- How many of this process's threads are closing a dropped VM's fd (vmcore/src/vm/reaper.rs).
local function reapers()
  local p = assert(io.popen("cat /proc/" .. helper.pid .. "/task/*/comm 2>/dev/null"))
  local n = 0
  for name in p:lines() do
    if name == "vmcore-reaper" then
      n = n + 1
    end
  end
  p:close()
  return n
end

--- The number of threads and open file descriptors of this process.
function helper.resources(expected)
  local function now_counted()
    return {
      threads = count_entries("/proc/" .. helper.pid .. "/task"),
      fds = count_entries("/proc/" .. helper.pid .. "/fd"),
    }
  end
  local monotonic = helper.vmcore.monotonic
  if not expected then
    -- VMs an earlier test dropped without closing are freed when the collector gets to them,
    -- which could otherwise be in the middle of this measurement (twice: a userdata with __gc
    -- is freed by the cycle after the one that finalizes it).
    collectgarbage("collect")
    collectgarbage("collect")
  end
  local counted = now_counted()
  local deadline = monotonic() + 2
  if not expected then
    -- A dropped VM's fd is closed on a reaper thread that holds a copy of it for the kernel's
    -- tens of milliseconds, and the kernel's own thread for that VM (kvm-nx-lpage-recovery)
    -- leaves with it: a baseline taken meanwhile would count threads and an fd that are gone
    -- by the time it is compared. So a baseline waits (up to 2 s) until no reaper runs and two
    -- counts in a row agree.
    while monotonic() < deadline do
      os.execute("sleep 0.01")
      local again = now_counted()
      local settled = again.threads == counted.threads and again.fds == counted.fds and reapers() == 0
      counted = again
      if settled then
        break
      end
    end
    return counted
  end
  -- A joined thread leaves /proc/<pid>/task a moment after pthread_join returns, and a reaper
  -- closes a VM's fd after the VM is gone, so a count expected to be back to `expected` gets up
  -- to two seconds to settle.
  while (counted.threads ~= expected.threads or counted.fds ~= expected.fds)
    and monotonic() < deadline do
    os.execute("sleep 0.01")
    counted = now_counted()
  end
  return counted
end

return helper
