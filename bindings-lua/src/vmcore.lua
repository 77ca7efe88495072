-- The Lua face of vmcore, compiled into vmcore.so and run once by require("vmcore").
--
-- It receives the native table from lib.rs and builds the objects Lua code uses: Vm, Console,
-- Registers, and the outcome and match tables. It only shapes calls; the VM logic is all in the
-- Rust core. Native calls return `true, results...` or `false, "vmcore.<Kind>: message"`; check()
-- raises the latter as a plain string error (level 0, so no position is prepended and the message
-- starts with the kind).

local native = ...

local error, getmetatable, setmetatable, rawget, rawset, tostring, type, pcall, format, tointeger =
  error, getmetatable, setmetatable, rawget, rawset, tostring, type, pcall, string.format, math.tointeger

local function check(ok, ...)
  if ok then
    return ...
  end
  error((...), 0)
end

-- Private keys of the objects below, unreachable from outside this file.
local NATIVE, INDEX, REGS, CONSOLE, VCPUS = {}, {}, {}, {}, {}
local HOOKS, RESULTS, DISPATCH, VM, VETOED, STOPPED, RESULT = {}, {}, {}, {}, {}, {}, {}

local M = {
  version = native.version,
  REGISTER_NAMES = native.REGISTER_NAMES,
  -- Seconds on a monotonic wall clock (os.clock is CPU time), for timing runs.
  monotonic = native.monotonic,
}

--- The most detailed level of the core's log records to keep: "off", "error", "warn" (the
--- default, or $VMCORE_LOG), "info", "debug" or "trace".
function M.set_log_level(level)
  return check(native.set_log_level(level))
end

--- Takes the log records kept since the last call: a list of {level=, target=, message=},
--- oldest first, and the number dropped because the queue (10,000) was full.
M.logs = native.logs

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

-- The outcome `t` of VM `vm` (a native table, or nil). A hook_stop outcome carries the key under
-- which the VM keeps the value passed to ev:stop (see RESULTS in M.Vm); it becomes `result`.
local function outcome(vm, t)
  if t == nil then
    return nil
  end
  local token = t.result_token
  if token ~= nil then
    t.result_token = nil
    t.result = rawget(vm, RESULTS)[token]
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
  return check(rawget(self, NATIVE):console_output(rawget(self, INDEX)))
end

function console_fields.output_bytes(self)
  return check(rawget(self, NATIVE):console_output_bytes(rawget(self, INDEX)))
end

function console_fields.dropped(self)
  return check(rawget(self, NATIVE):console_dropped(rawget(self, INDEX)))
end

function console_methods.tail(self)
  return check(native_of(self, Console, "tail"):console_tail(rawget(self, INDEX)))
end

function console_methods.send(self, data)
  return check(native_of(self, Console, "send"):console_send(data, rawget(self, INDEX)))
end

function console_methods.expect(self, pattern, timeout)
  local handle = native_of(self, Console, "expect")
  return setmetatable(check(handle:console_expect(pattern, timeout, rawget(self, DISPATCH), rawget(self, INDEX))), Match)
end

function Console.__tostring(self)
  local ok, out = rawget(self, NATIVE):console_output_bytes(rawget(self, INDEX))
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

--- How many breakpoint addresses hooks may use: x86's four debug registers, less the one vmcore
--- needs on hosts whose KVM leaves SYSCALLs half done.
function vm_fields.breakpoint_capacity(self)
  return check(rawget(self, NATIVE):breakpoint_capacity())
end

function vm_fields.is_running(self)
  return check(rawget(self, NATIVE):is_running())
end

function vm_fields.closed(self)
  return check(rawget(self, NATIVE):closed())
end

function vm_fields.outcome(self)
  return outcome(self, check(rawget(self, NATIVE):outcome()))
end

--- "created", "loaded", "running", "paused", "ended" or "closed".
function vm_fields.state(self)
  return check(rawget(self, NATIVE):state())
end

-- Methods whose results need no shaping.
for _, name in ipairs({
  "load_flat", "load_elf", "load_multiboot", "load_kernel", "load_linux", "add_fw_cfg_file",
  "read_phys", "write_phys", "read_virt", "write_virt",
  "translate", "stats", "cpuid_ignored",
  "sample_rip", "rip_samples", "clear_rip_samples", "profile",
}) do
  vm_methods[name] = function(self, ...)
    local handle = native_of(self, Vm, name)
    return check(handle[name](handle, ...))
  end
end

-- Before a run starts, drops the ev:stop results no outcome can show any more: all but the one
-- the current outcome shows, which stays if the start is refused. While the VM runs nothing is
-- dropped (a start is refused then, and the run's own hooks may have stopped it).
local function forget_results(self, handle)
  local results = rawget(self, RESULTS)
  if next(results) == nil or select(2, handle:state()) == "running" then
    return
  end
  local ok, last = handle:outcome()
  if not ok then
    return
  end
  local kept = last and last.result_token
  for token in pairs(results) do
    if token ~= kept then
      results[token] = nil
    end
  end
end

-- Calls that wait for the guest serve its hooks meanwhile: they hand the native side this VM's
-- hook dispatcher. run and wait return an outcome (or nil), and raise a hook's error.
function vm_methods.start(self, timeout)
  local handle = native_of(self, Vm, "start")
  forget_results(self, handle)
  check(handle:start(timeout, rawget(self, DISPATCH)))
end

function vm_methods.run(self, timeout)
  local handle = native_of(self, Vm, "run")
  forget_results(self, handle)
  return outcome(self, check(handle:run(timeout, rawget(self, DISPATCH))))
end

function vm_methods.wait(self, timeout)
  local handle = native_of(self, Vm, "wait")
  return outcome(self, check(handle:wait(timeout, rawget(self, DISPATCH))))
end

--- Ends a running or paused VM ("stopped"); returns the last outcome, or nil if it never ran. From
--- one of its hooks it returns nil at once and the run ends when the hook returns.
function vm_methods.stop(self)
  local handle = native_of(self, Vm, "stop")
  return outcome(self, check(handle:stop(rawget(self, DISPATCH))))
end

--- Pauses a running VM: whoever waits for the run gets outcome "paused", and resume() or the next
--- start/run continues the same guest. From one of its hooks it takes effect when the hook returns.
function vm_methods.pause(self)
  local handle = native_of(self, Vm, "pause")
  check(handle:pause(rawget(self, DISPATCH)))
end

--- Continues a paused VM with what was left of its run's timeout.
function vm_methods.resume(self)
  local handle = native_of(self, Vm, "resume")
  forget_results(self, handle)
  check(handle:resume())
end

-- Empties a table in place (the dispatcher holds the same table).
local function clear(t)
  for k in pairs(t) do
    t[k] = nil
  end
end

--- Stops the VM for good and frees it; idempotent. From one of its hooks the run ends when the
--- hook returns. The Lua values it held (hooks, filters, ev:stop results) go at once.
function vm_methods.close(self)
  local handle = native_of(self, Vm, "close")
  check(handle:close())
  clear(rawget(self, HOOKS))
  clear(rawget(self, RESULTS))
end

---------------------------------------------------------------------------------------------
-- Hooks. The native side calls a VM's dispatcher, on this thread, with a hook id and an event
-- table whenever a vCPU waits for one of its Lua hooks; the dispatcher calls the hook and returns
-- its decisions (see `answer` in hooks.rs).

local event_methods = {}
local Event = { __name = "vmcore.HookEvent" }

function Event.__index(self, key)
  local m = event_methods[key]
  if m ~= nil then
    return m
  end
  if key == "vm" then
    return rawget(self, VM)
  elseif key == "regs" then
    return rawget(self, VM).vcpus[rawget(self, "vcpu")].regs
  elseif key == "vetoed" then
    return rawget(self, VETOED) == true
  end
  return nil
end

-- Assigning a field the event does not have is a mistake (`ev.vlaue = 1`), except `value` on a
-- read, which has none until a hook supplies it. (Fields the event has are plain table fields.)
function Event.__newindex(self, key, value)
  if key ~= "value" then
    error(format("vmcore.HookEvent has no field %s (a hook assigns only ev.value)", tostring(key)), 2)
  end
  rawset(self, key, value)
end

function Event.__tostring(self)
  return format("vmcore.HookEvent %s vcpu=%d rip=0x%x", rawget(self, "kind"), rawget(self, "vcpu"), rawget(self, "rip"))
end

--- Drops the write: it never reaches the device, MSR or control register.
function event_methods.veto(self)
  rawset(self, VETOED, true)
end

--- Ends the run after this event with outcome "hook_stop"; `result` becomes outcome.result (and
--- outcome.code when it is an integer).
function event_methods.stop(self, result)
  rawset(self, STOPPED, true)
  rawset(self, RESULT, result)
end

function event_methods.read_virt(self, address, length)
  return rawget(self, VM):read_virt(rawget(self, "vcpu"), address, length)
end

function event_methods.read_phys(self, address, length)
  return rawget(self, VM):read_phys(address, length)
end

function event_methods.write_phys(self, address, data)
  return rawget(self, VM):write_phys(address, data)
end

-- A raised value as the message of a hook error (as lua.c shows an error object).
local function error_message(err)
  if type(err) == "string" or type(err) == "number" then
    return tostring(err)
  end
  local mt = getmetatable(err)
  if type(mt) == "table" and rawget(mt, "__tostring") ~= nil then
    local ok, text = pcall(tostring, err)
    if ok and type(text) == "string" then
      return text
    end
  end
  return format("(error object is a %s value)", type(err))
end

-- A value's type, with the value for numbers, booleans and strings, for error messages.
local function describe(v)
  if type(v) == "string" then
    return format("string %q", v)
  elseif type(v) == "number" then
    return format("%s %s", math.type(v), tostring(v))
  elseif type(v) == "boolean" then
    return format("boolean %s", tostring(v))
  end
  return type(v)
end

-- A u64 bit pattern from a Lua number (integer, or integral float); nil for anything else.
local function bits(v)
  if type(v) == "number" then
    return tointeger(v)
  end
  return nil
end

-- What the native side sends as the kind of a frame for an on_packet filter (`PACKET_CODE`).
local PACKET = 11

-- Event kinds by the number the native side sends (`kind_code` in hooks.rs).
local KINDS = { "io", "mmio", "msr", "cpuid", "cr", "breakpoint", "step", "hlt", "shutdown", "exit" }

-- The dispatcher of one VM: called by the native side with a hook id and the event's fields
-- (see `operands` in hooks.rs); calls the hook and returns its decisions (see `answer` there).
-- The value a hook passes to ev:stop goes into `results` under a new token, which the native
-- side hands back in the outcome.
local function dispatcher(vm, hooks, results)
  local last_token = 0
  return function(id, code, vcpu, rip, value, instruction, a, b, c)
    local fn = hooks[id]
    if fn == nil then
      -- Removed after it fired: the event passes.
      return true, value
    end
    if code == PACKET then
      -- A network filter: fn(frame) returns false to drop the frame.
      local ok, keep = pcall(fn, a)
      if not ok then
        return false, error_message(keep)
      end
      return true, keep == false and 0 or 1
    end
    local kind = KINDS[code]
    instruction = instruction or ""
    local ev
    if kind == "io" then
      ev = { kind = kind, vcpu = vcpu, rip = rip, value = value, instruction = instruction, [VM] = vm,
        port = a, size = b, is_write = c }
    elseif kind == "mmio" then
      ev = { kind = kind, vcpu = vcpu, rip = rip, value = value, instruction = instruction, [VM] = vm,
        address = a, size = b, is_write = c }
    elseif kind == "msr" then
      ev = { kind = kind, vcpu = vcpu, rip = rip, value = value, instruction = instruction, [VM] = vm,
        index = a, is_write = b }
    elseif kind == "cpuid" then
      ev = { kind = kind, vcpu = vcpu, rip = rip, value = value, instruction = instruction, [VM] = vm,
        leaf = a, subleaf = b }
    elseif kind == "cr" then
      ev = { kind = kind, vcpu = vcpu, rip = rip, value = value, instruction = instruction, [VM] = vm,
        cr = a, old = b, is_write = c }
    elseif kind == "breakpoint" then
      ev = { kind = kind, vcpu = vcpu, rip = rip, value = value, instruction = instruction, [VM] = vm, address = a }
    elseif kind == "exit" then
      ev = { kind = kind, vcpu = vcpu, rip = rip, value = value, instruction = instruction, [VM] = vm, reason = a }
    else
      ev = { kind = kind, vcpu = vcpu, rip = rip, value = value, instruction = instruction, [VM] = vm }
    end
    setmetatable(ev, Event)
    local ok, r1, r2, r3, r4 = pcall(fn, ev)
    if not ok then
      return false, error_message(r1)
    end
    value = rawget(ev, "value")
    local eax, ebx, ecx, edx
    if r1 ~= nil then
      if kind == "cpuid" then
        if type(r1) == "table" then
          r1, r2, r3, r4 = r1[1], r1[2], r1[3], r1[4]
        end
        eax, ebx, ecx, edx = bits(r1), bits(r2), bits(r3), bits(r4)
        if not (eax and ebx and ecx and edx) then
          return false, format("a CPUID hook returns eax, ebx, ecx, edx (four integers, or a table of four) "
            .. "or nil, not %s", describe(r1))
        end
        eax, ebx, ecx, edx = eax & 0xffffffff, ebx & 0xffffffff, ecx & 0xffffffff, edx & 0xffffffff
      elseif c == false or (kind == "msr" and b == false) then
        -- A read (is_write is false): the hook's return value is the value read.
        value = r1
      end
    end
    if value ~= nil then
      local v = bits(value)
      if v == nil then
        return false, format("a read hook returns an integer (the value) or nil, and ev.value must be an "
          .. "integer, not %s", describe(value))
      end
      value = v
    end
    local vetoed, stopped = rawget(ev, VETOED) == true, rawget(ev, STOPPED) == true
    if not (vetoed or stopped or eax) then
      return true, value
    end
    local result, detail, token = rawget(ev, RESULT), nil, false
    if stopped then
      detail = result == nil and "stopped by a hook" or error_message(result)
      last_token = last_token + 1
      token = last_token
      results[token] = result
    end
    return true, value, vetoed, token, result, detail, eax, ebx, ecx, edx
  end
end

-- Registers hook `fn` of `kind`: `params` holds the positional arguments, `opts` the options.
local function add_hook(self, method, kind, params, opts, fn)
  local handle = native_of(self, Vm, method)
  local mt = getmetatable(fn)
  if type(fn) ~= "function" and not (type(mt) == "table" and rawget(mt, "__call") ~= nil) then
    error(format("vmcore.ConfigError: invalid configuration: %s needs a function (the hook) as its last "
      .. "argument, got %s", method, type(fn)), 0)
  end
  local id = check(handle:add_hook(kind, params, opts))
  rawget(self, HOOKS)[id] = fn
  return id
end

-- (a, fn) or (a, opts, fn): the options table is optional.
local function split(opts, fn)
  if fn == nil then
    return nil, opts
  end
  return opts, fn
end

--- vm:on_cpuid(leaf, [{subleaf=, precise=}], fn): fn(ev) returns eax, ebx, ecx, edx or nothing.
function vm_methods.on_cpuid(self, leaf, opts, fn)
  opts, fn = split(opts, fn)
  return add_hook(self, "on_cpuid", "cpuid", { leaf = leaf }, opts, fn)
end

--- vm:on_cr(cr, [{write=true|false|"both"}], fn): writes by default.
function vm_methods.on_cr(self, cr, opts, fn)
  opts, fn = split(opts, fn)
  return add_hook(self, "on_cr", "cr", { cr = cr }, opts, fn)
end

--- vm:on_msr(index, [{write=true|false|"both"}], fn): RDMSR by default.
function vm_methods.on_msr(self, index, opts, fn)
  opts, fn = split(opts, fn)
  return add_hook(self, "on_msr", "msr", { index = index }, opts, fn)
end

--- vm:on_io(port, [{size=, write=}], fn): IN and OUT by default.
function vm_methods.on_io(self, port, opts, fn)
  opts, fn = split(opts, fn)
  return add_hook(self, "on_io", "io", { port = port }, opts, fn)
end

--- vm:on_mmio(address, size, [{write=}], fn): reads and writes by default.
function vm_methods.on_mmio(self, address, size, opts, fn)
  opts, fn = split(opts, fn)
  return add_hook(self, "on_mmio", "mmio", { address = address, size = size }, opts, fn)
end

function vm_methods.on_breakpoint(self, address, fn)
  return add_hook(self, "on_breakpoint", "breakpoint", { address = address }, nil, fn)
end

function vm_methods.on_step(self, fn)
  return add_hook(self, "on_step", "step", {}, nil, fn)
end

--- fn(ev) once when a vCPU is found halted with interrupts off; ev:stop(result) ends the run.
function vm_methods.on_hlt(self, fn)
  return add_hook(self, "on_hlt", "hlt", {}, nil, fn)
end

function vm_methods.on_exit(self, fn)
  return add_hook(self, "on_exit", "exit", {}, nil, fn)
end

function vm_methods.on_shutdown(self, fn)
  return add_hook(self, "on_shutdown", "shutdown", {}, nil, fn)
end

--- Removes a hook by the id on_* returned; returns whether it was registered.
function vm_methods.remove_hook(self, id)
  local handle = native_of(self, Vm, "remove_hook")
  local removed = check(handle:remove_hook(id))
  if removed then
    rawget(self, HOOKS)[id] = nil
  end
  return removed
end

---------------------------------------------------------------------------------------------
-- Devices

local net_methods, net_fields = {}, {}
local Net = class("vmcore.Net", net_methods, net_fields)

for _, name in ipairs({ "index", "mac", "tap", "base", "gsi", "kind", "description" }) do
  net_fields[name] = function(self)
    return rawget(self, INDEX)[name]
  end
end

function net_fields.stats(self)
  return check(rawget(self, NATIVE):net_stats(rawget(self, INDEX).index))
end

--- net:inject(frame): queues an Ethernet frame (14 to 1518 bytes) for the guest.
function net_methods.inject(self, frame)
  return check(native_of(self, Net, "inject"):net_inject(rawget(self, INDEX).index, frame))
end

--- net:link(other): what one guest sends, the other receives (usually devices of two VMs).
function net_methods.link(self, other)
  local handle = native_of(self, Net, "link")
  if getmetatable(other) ~= Net then
    error("vmcore.ConfigError: invalid configuration: net:link needs another vmcore.Net", 2)
  end
  return check(handle:net_link(rawget(self, INDEX).index, rawget(other, NATIVE), rawget(other, INDEX).index))
end

function net_methods.unlink(self)
  return check(native_of(self, Net, "unlink"):net_unlink(rawget(self, INDEX).index))
end

--- net:on_packet(fn): fn(frame) sees each frame the guest sends; returning false drops it. It
--- is called while this VM's Lua thread waits in run, wait, expect... (frames wait until then).
--- net:on_packet(nil) removes it.
function net_methods.on_packet(self, fn)
  local handle = native_of(self, Net, "on_packet")
  local index = rawget(self, INDEX).index
  if fn == nil then
    return check(handle:net_filter(index, false))
  end
  local mt = getmetatable(fn)
  if type(fn) ~= "function" and not (type(mt) == "table" and rawget(mt, "__call") ~= nil) then
    error(format("vmcore.ConfigError: invalid configuration: on_packet needs a function, got %s", type(fn)), 2)
  end
  local id = check(handle:net_filter(index, true))
  rawget(rawget(self, VM), HOOKS)[id] = fn
  return id
end

function Net.__tostring(self)
  local d = rawget(self, INDEX)
  return format("vmcore.Net %d %s%s", d.index, d.mac, d.tap and (" tap=" .. d.tap) or "")
end

--- vm:add_disk(path, [{readonly=false, serial=nil}]): a virtio-blk disk on a raw image; returns
--- its description {index=, kind="block", base=, gsi=, description=}.
function vm_methods.add_disk(self, path, opts)
  return check(native_of(self, Vm, "add_disk"):add_disk(path, opts))
end

--- vm:add_rng(): a virtio-rng device fed by the host's getrandom.
function vm_methods.add_rng(self)
  return check(native_of(self, Vm, "add_rng"):add_rng())
end

--- vm:add_net([{tap=, mac=, on_packet=}]): a virtio-net device; returns a vmcore.Net.
function vm_methods.add_net(self, opts)
  local handle = native_of(self, Vm, "add_net")
  local on_packet = type(opts) == "table" and rawget(opts, "on_packet") or nil
  local net = setmetatable({ [NATIVE] = handle, [INDEX] = check(handle:add_net(opts)), [VM] = self }, Net)
  if on_packet ~= nil then
    net:on_packet(on_packet)
  end
  return net
end

--- vm:add_console(): a virtio-console device, a second console (Linux's /dev/hvc0) with the same
--- output, expect, send and tail as vm.console.
function vm_methods.add_console(self)
  local handle = native_of(self, Vm, "add_console")
  local device = check(handle:add_console())
  return setmetatable({ [NATIVE] = handle, [DISPATCH] = rawget(self, DISPATCH), [INDEX] = device.index }, Console)
end

function vm_fields.virtio_devices(self)
  return check(rawget(self, NATIVE):virtio_devices())
end

-- `local vm <close> = vmcore.Vm{}` closes the VM when `vm` goes out of scope.
Vm.__close = vm_methods.close

function Vm.__tostring(self)
  local handle = rawget(self, NATIVE)
  local _, state = handle:state()
  if state == "closed" then
    return "vmcore.Vm (closed)"
  end
  local _, size = handle:memory_size()
  local _, count = handle:vcpu_count()
  if state == "ended" or state == "paused" then
    local ok, last = handle:outcome()
    if ok and last then
      state = last.summary
    end
  end
  return format("vmcore.Vm memory=%dM vcpus=%d %s", size >> 20, count, state)
end

--- vmcore.Vm{memory="64M", vcpus=1, tee=nil, precise="step"}: a new virtual machine. `memory`
--- is bytes or a size such as "64M"; `tee` copies console output to "stdout", "stderr" or a file
--- path; `precise` is how precise CPUID and control-register hooks find their instructions,
--- "step" (single-step) or "trap" (int3 at those instructions of the loaded image).
function M.Vm(opts)
  local handle = check(native.new_vm(opts))
  local count = check(handle:vcpu_count())
  -- Every Lua value the VM holds is reachable from this table only, never from the registry or
  -- from Rust: the hooks and packet filters (HOOKS), the values hooks passed to ev:stop (RESULTS,
  -- which the core's outcome names by token) and the dispatcher. A hook or a result that refers
  -- to its VM then makes a cycle the collector sees, and a VM nothing else refers to is freed.
  -- (A registry reference would be a root: the VM would live, with its fds and memory, for good.)
  local hooks, results = {}, {}
  local vm = { [NATIVE] = handle, [VCPUS] = vcpu_list(handle, count), [HOOKS] = hooks, [RESULTS] = results }
  local dispatch = dispatcher(vm, hooks, results)
  vm[DISPATCH] = dispatch
  vm[CONSOLE] = setmetatable({ [NATIVE] = handle, [DISPATCH] = dispatch }, Console)
  return setmetatable(vm, Vm)
end

return M
