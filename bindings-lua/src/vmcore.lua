-- The Lua face of vmcore, compiled into vmcore.so and run once by require("vmcore").
--
-- It receives the native table from lib.rs and builds the objects Lua code uses: Vm, Console,
-- Registers, and the outcome and match tables. It only shapes calls; the VM logic is all in the
-- Rust core. Native calls return `true, results...` or `false, "vmcore.<Kind>: message"`; check()
-- raises the latter as a plain string error (level 0, so no position is prepended and the message
-- starts with the kind).

local native = ...

local error, getmetatable, setmetatable, rawget, tostring, type, format =
  error, getmetatable, setmetatable, rawget, tostring, type, string.format

local function check(ok, ...)
  if ok then
    return ...
  end
  error((...), 0)
end

-- Private keys of the objects below, unreachable from outside this file.
local NATIVE, INDEX, REGS, CONSOLE, VCPUS = {}, {}, {}, {}, {}

local M = {
  version = native.version,
  REGISTER_NAMES = native.REGISTER_NAMES,
}

--- Parses "64M"-style sizes exactly as vmcore.Vm{memory=...} does; returns bytes.
function M.parse_memory_size(text)
  return check(native.parse_memory_size(text))
end

-- Builds a metatable for a read-only object with methods and computed fields. A computed field
-- is a function of the object, called on every read.
local function class(name, methods, fields)
  local mt = { __name = name }
  function mt.__index(self, key)
    local m = methods[key]
    if m ~= nil then
      return m
    end
    local f = fields[key]
    if f ~= nil then
      return f(self)
    end
    return nil
  end
  function mt.__newindex(_, key)
    error(format("%s: field %s is read-only", name, tostring(key)), 2)
  end
  return mt
end

-- The native handle of `self`, checking that a method was called with ':' on the right object.
local function native_of(self, mt, method)
  if getmetatable(self) ~= mt then
    error(format("bad self for %s:%s (use obj:%s(...), not obj.%s(...))", mt.__name, method, method, method), 3)
  end
  return rawget(self, NATIVE)
end

-- Outcome and match tables: plain tables with a __tostring.
local Outcome = { __name = "vmcore.Outcome" }
function Outcome.__tostring(o)
  return o.summary
end
local function outcome(t)
  if t == nil then
    return nil
  end
  return setmetatable(t, Outcome)
end

local Match = { __name = "vmcore.Match" }
function Match.__tostring(m)
  return m.text
end

---------------------------------------------------------------------------------------------
-- Console

local console_methods, console_fields = {}, {}
local Console = class("vmcore.Console", console_methods, console_fields)

function console_fields.output(self)
  return check(rawget(self, NATIVE):console_output())
end

function console_fields.output_bytes(self)
  return check(rawget(self, NATIVE):console_output_bytes())
end

function console_methods.tail(self)
  return check(native_of(self, Console, "tail"):console_tail())
end

function console_methods.send(self, data)
  return check(native_of(self, Console, "send"):console_send(data))
end

function console_methods.expect(self, pattern, timeout)
  return setmetatable(check(native_of(self, Console, "expect"):console_expect(pattern, timeout)), Match)
end

function Console.__tostring(self)
  local ok, out = rawget(self, NATIVE):console_output_bytes()
  return ok and format("vmcore.Console (%d bytes)", #out) or "vmcore.Console (closed)"
end

---------------------------------------------------------------------------------------------
-- Registers: regs.rip reads, regs.rax = 5 writes, pairs(regs) walks every register.

local register_methods = {}
local Registers = { __name = "vmcore.Registers" }

function register_methods.as_table(self)
  return check(native_of(self, Registers, "as_table"):registers(rawget(self, INDEX)))
end

function Registers.__index(self, name)
  local m = register_methods[name]
  if m ~= nil then
    return m
  end
  return check(rawget(self, NATIVE):register(rawget(self, INDEX), name))
end

function Registers.__newindex(self, name, value)
  check(rawget(self, NATIVE):set_register(rawget(self, INDEX), name, value))
end

-- One snapshot, walked in REGISTER_NAMES order.
function Registers.__pairs(self)
  local snapshot = register_methods.as_table(self)
  local names, i = M.REGISTER_NAMES, 0
  return function()
    i = i + 1
    local name = names[i]
    if name ~= nil then
      return name, snapshot[name]
    end
  end, self, nil
end

function Registers.__tostring(self)
  local ok, regs = rawget(self, NATIVE):registers(rawget(self, INDEX))
  if not ok then
    return format("vmcore.Registers vcpu=%d (%s)", rawget(self, INDEX), regs)
  end
  return format("vmcore.Registers vcpu=%d rip=0x%x rsp=0x%x rax=0x%x rflags=0x%x cr0=0x%x cr3=0x%x",
    rawget(self, INDEX), regs.rip, regs.rsp, regs.rax, regs.rflags, regs.cr0, regs.cr3)
end

---------------------------------------------------------------------------------------------
-- vCPUs: vm.vcpus[i] for i = 0 .. #vm.vcpus - 1 (0-based: the index is the APIC ID).

local Vcpu = class("vmcore.Vcpu", {}, {
  index = function(self)
    return rawget(self, INDEX)
  end,
  regs = function(self)
    return rawget(self, REGS)
  end,
})

function Vcpu.__tostring(self)
  return format("vmcore.Vcpu %d", rawget(self, INDEX))
end

local function vcpu_list(handle, count)
  local list = {}
  for i = 0, count - 1 do
    local regs = setmetatable({ [NATIVE] = handle, [INDEX] = i }, Registers)
    list[i] = setmetatable({ [REGS] = regs, [INDEX] = i }, Vcpu)
  end
  return setmetatable(list, {
    __name = "vmcore.VcpuList",
    __len = function()
      return count
    end,
    __newindex = function()
      error("vmcore.VcpuList is read-only", 2)
    end,
  })
end

---------------------------------------------------------------------------------------------
-- Vm

local vm_methods, vm_fields = {}, {}
local Vm = class("vmcore.Vm", vm_methods, vm_fields)

function vm_fields.console(self)
  return rawget(self, CONSOLE)
end

function vm_fields.vcpus(self)
  return rawget(self, VCPUS)
end

function vm_fields.memory_size(self)
  return check(rawget(self, NATIVE):memory_size())
end

function vm_fields.vcpu_count(self)
  return check(rawget(self, NATIVE):vcpu_count())
end

function vm_fields.is_running(self)
  return check(rawget(self, NATIVE):is_running())
end

function vm_fields.closed(self)
  return check(rawget(self, NATIVE):closed())
end

function vm_fields.outcome(self)
  return outcome(check(rawget(self, NATIVE):outcome()))
end

-- Methods whose results need no shaping.
for _, name in ipairs({
  "load_flat", "load_elf", "start", "read_phys", "write_phys", "read_virt", "write_virt",
  "translate", "stats", "close",
}) do
  vm_methods[name] = function(self, ...)
    local handle = native_of(self, Vm, name)
    return check(handle[name](handle, ...))
  end
end

-- Methods that return an outcome (or nil).
for _, name in ipairs({ "run", "wait", "stop" }) do
  vm_methods[name] = function(self, ...)
    local handle = native_of(self, Vm, name)
    return outcome(check(handle[name](handle, ...)))
  end
end

-- `local vm <close> = vmcore.Vm{}` closes the VM when `vm` goes out of scope.
function Vm.__close(self)
  rawget(self, NATIVE):close()
end

function Vm.__tostring(self)
  local handle = rawget(self, NATIVE)
  local _, closed = handle:closed()
  if closed then
    return "vmcore.Vm (closed)"
  end
  local _, size = handle:memory_size()
  local _, count = handle:vcpu_count()
  local _, running = handle:is_running()
  local state = "ready"
  if running then
    state = "running"
  else
    local _, last = handle:outcome()
    if last then
      state = last.summary
    end
  end
  return format("vmcore.Vm memory=%dM vcpus=%d %s", size >> 20, count, state)
end

--- vmcore.Vm{memory="64M", vcpus=1, tee=nil}: a new virtual machine. `memory` is bytes or a
--- size such as "64M"; `tee` copies console output to "stdout", "stderr" or a file path.
function M.Vm(opts)
  local handle = check(native.new_vm(opts))
  local count = check(handle:vcpu_count())
  return setmetatable({
    [NATIVE] = handle,
    [CONSOLE] = setmetatable({ [NATIVE] = handle }, Console),
    [VCPUS] = vcpu_list(handle, count),
  }, Vm)
end

return M
