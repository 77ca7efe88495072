-- Hooks from Lua: CPUID, control registers, MSRs, ports, breakpoints, steps, exits, halts and
-- errors (the same cases as tests/python/test_hooks.py), and how the Lua thread serves hooks
-- while it waits for the VM.

-- helper.lua sits beside this file; finding it from here lets busted run from any directory.
package.path = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "?.lua;" .. package.path
local helper = require("helper")
local vmcore = helper.vmcore

-- Wall-clock seconds (10 ms resolution), for "returns promptly" checks.
local function now()
  local f = assert(io.open("/proc/uptime", "r"))
  local t = f:read("n")
  f:close()
  return t
end

-- Keeps this (Lua) thread busy for `seconds` of CPU time, without serving any hook.
local function busy(seconds)
  local until_ = os.clock() + seconds
  while os.clock() < until_ do
  end
end

local function lines(text)
  local out = {}
  for line in text:gmatch("[^\n]+") do
    out[#out + 1] = line
  end
  return out
end

describe("hooks", function()
  local vm

  local function new_vm(opts)
    vm = vmcore.Vm(opts or { memory = "64M" })
    return vm
  end

  after_each(function()
    if vm then
      vm:close()
      vm = nil
    end
  end)

  for _, case in ipairs({
    { name = "static", precise = false, mode = "step" },
    { name = "single-step", precise = true, mode = "step" },
    { name = "site-trap", precise = true, mode = "trap" },
  }) do
    it("answers CPUID and logs the leaf (" .. case.name .. ")", function()
      new_vm({ memory = "64M", precise = case.mode })
      local log = {}
      vm:on_cpuid(0x40000100, { precise = case.precise }, function(ev)
        assert.are.equal("cpuid", ev.kind)
        log[#log + 1] = ("cpuid: unsupported rax=0x%x"):format(ev.leaf)
          .. (case.precise and (" @ 0x%x"):format(ev.rip) or "")
        if case.precise then
          return 0x12345678, 0x9ABCDEF0, 0x0BADCAFE, 0x600DF00D
        end
        return { 0x12345678, 0x9ABCDEF0, 0x0BADCAFE, 0x600DF00D } -- a table of four works too
      end)
      vm:load_elf(helper.guest_path("cpuid.elf"))
      assert.are.equal("halted", vm:run({ timeout = 5 }).reason)
      assert.are.equal("cpuid 40000100: eax=12345678 ebx=9abcdef0 ecx=0badcafe edx=600df00d\n", vm.console.output)
      if case.precise then
        local site = helper.symbol("cpuid.elf", "cpuid_site")
        assert.are.same({ ("cpuid: unsupported rax=0x40000100 @ 0x%x"):format(site) }, log)
        assert.are.equal(1, vm:stats().cpuid_leaves[0x40000100])
      else
        assert.are.same({ "cpuid: unsupported rax=0x40000100" }, log, "asked once, before the run")
        assert.are.same({}, vm:cpuid_ignored())
      end
    end)
  end

  for _, mode in ipairs({ "step", "trap" }) do
    it("logs a CR8 write with its rip and vetoes a CR4 write (" .. mode .. ")", function()
      new_vm({ memory = "64M", precise = mode })
      local log = {}
      vm:on_cr(8, function(ev)
        log[#log + 1] = ("cr: mov to cr%d @ 0x%x"):format(ev.cr, ev.rip)
        assert.are.equal(5, ev.value)
        assert.are.equal("mov %rax,%cr8", ev.instruction)
        assert.is_true(ev.is_write)
      end)
      vm:on_cr(4, function(ev)
        assert.are.equal(ev.old | 0x4, ev.value)
        ev:veto()
        assert.is_true(ev.vetoed)
      end)
      vm:load_elf(helper.guest_path("cr.elf"))
      assert.are.equal("halted", vm:run({ timeout = 5 }).reason)
      assert.are.same({ ("cr: mov to cr8 @ 0x%x"):format(helper.symbol("cr.elf", "cr8_write")) }, log)
      local out = lines(vm.console.output)
      assert.are.equal(5, tonumber(out[1]:match("^cr8=(%x+)$"), 16))
      local cr4 = tonumber(out[2]:match("^cr4=(%x+)$"), 16)
      assert.are.equal(0, cr4 & 0x4, "the vetoed CR4 write never landed")
      assert.are.equal(0, vm.vcpus[0].regs.cr4 & 0x4)
      if mode == "trap" then
        assert.is_nil(vm:stats().exits.debug, "site-trap mode does not single-step")
      end
    end)
  end

  it("supplies the value a CR read gives", function()
    new_vm()
    vm:on_cr(4, { write = false }, function()
      return 0xABC
    end)
    vm:load_elf(helper.guest_path("cr.elf"))
    vm:run({ timeout = 5 })
    assert.are.equal("cr4=0000000000000abc", lines(vm.console.output)[2])
  end)

  it("traps real-mode code in site-trap mode, or says it cannot on this host", function()
    new_vm({ memory = "64M", precise = "trap" })
    vm:load_flat(helper.guest("hello-real.bin"), { address = 0x10000, mode = "real" })
    local ok, err = pcall(vm.on_cpuid, vm, 0x40000100, { precise = true }, function() end)
    if ok then
      assert.are.equal("halted", vm:run({ timeout = 5 }).reason)
    else
      -- There KVM runs a real-mode int3 through the guest's IVT: the trap would never come.
      assert.matches("^vmcore%.ConfigError: .*cannot trap real%-mode code on this host", err)
    end
  end)

  it("refuses an unknown precise mode", function()
    assert.matches("^vmcore%.ConfigError: .*precise mode", helper.error_of(vmcore.Vm, { precise = "telepathy" }))
  end)

  it("supplies an MSR the host does not know, as a 64-bit bit pattern", function()
    new_vm()
    local writes = {}
    vm:on_msr(0xC0FFEE, function(ev)
      assert.is_false(ev.is_write)
      assert.are.equal(0xC0FFEE, ev.index)
      return 0xFEEDFACECAFEBEEF -- a Lua integer: negative, the same 64 bits
    end)
    vm:on_msr(0xC0FFEE, { write = true }, function(ev)
      writes[#writes + 1] = ev.value
    end)
    vm:load_elf(helper.guest_path("msr.elf"))
    assert.are.equal("halted", vm:run({ timeout = 5 }).reason)
    assert.are.equal("msr c0ffee=feedfacecafebeef\nwrote\n", vm.console.output)
    assert.are.same({ 0x1122334455667788 }, writes)
    assert.are.equal(1, vm:stats().msr_reads[0xC0FFEE])
  end)

  it("leaves an unknown MSR faulting without a hook", function()
    new_vm()
    vm:load_elf(helper.guest_path("msr.elf"))
    assert.are.equal("shutdown", vm:run({ timeout = 5 }).reason)
  end)

  it("raises a hook's error out of run, once", function()
    new_vm()
    vm:on_io(0x3F8, { write = true }, function(ev)
      error(("boom: refusing byte 0x%x"):format(ev.value))
    end)
    vm:load_flat(helper.guest("hello-long.bin"))
    local err = helper.error_of(vm.run, vm, { timeout = 5 })
    assert.matches("^vmcore%.HookError: ", err)
    assert.matches("hooks_spec%.lua:%d+: boom: refusing byte 0x68", err)
    local out = vm.outcome
    assert.are.equal("hook_error", out.reason)
    assert.matches("boom: refusing byte 0x68", out.detail)
    -- Raised once: afterwards the outcome is returned.
    assert.are.equal("hook_error", vm:wait().reason)
    assert.are.equal("hook_error", vm:stop().reason)
  end)

  it("raises a hook's error out of wait", function()
    new_vm()
    vm:on_io(0x3F8, { write = true }, function()
      error("boom")
    end)
    vm:load_flat(helper.guest("hello-long.bin"))
    vm:start({ timeout = 5 })
    local err = helper.error_of(vm.wait, vm)
    assert.matches("^vmcore%.HookError: .*boom", err)
    assert.are.equal("hook_error", vm.outcome.reason)
  end)

  it("reports error values that are not strings", function()
    new_vm()
    vm:on_io(0x3F8, { write = true }, function()
      error({ code = 1 })
    end)
    vm:load_flat(helper.guest("hello-long.bin"))
    assert.matches("^vmcore%.HookError: %(error object is a table value%)$", helper.error_of(vm.run, vm, 5))
  end)

  it("raises a static CPUID hook's error out of run", function()
    new_vm()
    vm:on_cpuid(0x40000100, function()
      error("no table for you")
    end)
    vm:load_elf(helper.guest_path("cpuid.elf"))
    assert.matches("^vmcore%.HookError: .*no table for you", helper.error_of(vm.run, vm, 5))
  end)

  it("treats bad hook answers as errors", function()
    new_vm()
    vm:on_io(0x99, function()
      return "not a number"
    end)
    vm:load_flat(helper.guest("ports.bin"))
    assert.matches("^vmcore%.HookError: a read hook returns an integer", helper.error_of(vm.run, vm, 5))
  end)

  it("treats a bad CPUID answer as an error", function()
    new_vm()
    vm:on_cpuid(0x40000100, { precise = true }, function()
      return 1, 2, 3
    end)
    vm:load_elf(helper.guest_path("cpuid.elf"))
    assert.matches("^vmcore%.HookError: a CPUID hook returns eax, ebx, ecx, edx", helper.error_of(vm.run, vm, 5))
  end)

  it("supplies port reads, vetoes and rewrites port writes, and stops", function()
    new_vm()
    vm:on_io(0x99, { write = false }, function(ev)
      assert.are.same({ 0x99, 1, false }, { ev.port, ev.size, ev.is_write })
      return 0x42
    end)
    local seen = {}
    vm:on_io(0x98, { write = true }, function(ev)
      seen[#seen + 1] = ev.value
      ev:veto()
    end)
    vm:on_io(0x3F8, { write = true }, function(ev)
      ev.value = string.byte(string.char(ev.value):upper())
      if ev.value == string.byte("\n") then
        ev:stop(7)
      end
    end)
    vm:load_flat(helper.guest("ports.bin"))
    local out = vm:run({ timeout = 5 })
    assert.are.equal("hook_stop", out.reason)
    assert.are.equal(7, out.code)
    assert.are.equal(7, out.result)
    assert.are.equal("UNHANDLED READ GAVE SOMETHING ELSE", vm.console.output)
    assert.are.same({ 0x42, 0x42, 0x42 }, seen)
    assert.is_nil(next(vm:stats().unhandled_port_writes), "vetoed writes are not unhandled")
  end)

  it("asks hooks in order until one decides", function()
    new_vm()
    local asked = {}
    vm:on_io(0x99, { write = false }, function()
      asked[#asked + 1] = "first"
    end)
    vm:on_io(0x99, { write = false }, function()
      asked[#asked + 1] = "second"
      return 0xFF
    end)
    vm:on_io(0x99, { write = false }, function()
      asked[#asked + 1] = "third"
      return 0x42
    end)
    vm:load_flat(helper.guest("ports.bin"))
    vm:run({ timeout = 5 })
    assert.are.same({ "first", "second", "first", "second" }, asked)
    assert.are.equal("unhandled read gave ff\n", vm.console.output)
  end)

  it("lets a hook use its VM and hands any Lua value to outcome.result", function()
    new_vm()
    local halt_here = helper.symbol("hello-long.elf", "halt_here")
    local hits = {}
    local result = { at = "halt_here" }
    local id = vm:on_breakpoint(halt_here, function(ev)
      -- The vCPU is paused in this hook: its registers and memory are there to use.
      hits[#hits + 1] = { ev.rip, ev.regs.rip, ev:read_virt(ev.rip, 1), ev.vm == vm }
      assert.are.equal(ev.vm:read_phys(ev.rip, 1), "\xf4")
      ev.regs.rbx = 0x1234
      vm.vcpus[0].regs.rcx = 0x5678
      ev:stop(result)
    end)
    vm:load_elf(helper.guest_path("hello-long.elf"))
    local out = vm:run({ timeout = 5 })
    assert.are.equal("hook_stop", out.reason)
    assert.are.equal(result, out.result)
    assert.are.equal(result, vm.outcome.result)
    assert.is_nil(out.code)
    assert.are.same({ { halt_here, halt_here, "\xf4", true } }, hits)
    assert.are.equal(0x1234, vm.vcpus[0].regs.rbx)
    assert.are.equal(0x5678, vm.vcpus[0].regs.rcx)
    assert.is_true(vm:remove_hook(id))
    assert.is_false(vm:remove_hook(id))
  end)

  it("stops with an integer result as code", function()
    new_vm()
    vm:on_breakpoint(helper.symbol("hello-long.elf", "halt_here"), function(ev)
      ev:stop(7)
    end)
    vm:load_elf(helper.guest_path("hello-long.elf"))
    local out = vm:run({ timeout = 5 })
    assert.are.same({ "hook_stop", 7, 7 }, { out.reason, out.code, out.result })
  end)

  it("single-steps every instruction", function()
    new_vm()
    local rips = {}
    vm:on_step(function(ev)
      rips[#rips + 1] = ev.rip
    end)
    vm:load_flat(helper.guest("debug-exit.bin"))
    assert.are.equal(0x31, vm:run({ timeout = 10 }).code)
    assert.is_true(#rips > 100)
    for _, rip in ipairs(rips) do
      assert.is_true(rip >= 0x100000 and rip < 0x101000)
    end
  end)

  it("counts exits with an exit hook", function()
    new_vm()
    local reasons = {}
    vm:on_exit(function(ev)
      reasons[#reasons + 1] = ev.reason
    end)
    vm:load_flat(helper.guest("debug-exit.bin"))
    vm:run({ timeout = 5 })
    local io_out = 0
    for _, reason in ipairs(reasons) do
      if reason == "io_out" then
        io_out = io_out + 1
      end
    end
    local stats = vm:stats()
    assert.are.equal(stats.exits.io_out, io_out)
    assert.are.equal(stats.hook_calls, #reasons)
  end)

  it("hears a halt and may stop", function()
    new_vm()
    local halts = {}
    vm:on_hlt(function(ev)
      halts[#halts + 1] = ev.rip
      ev:stop("halted at the end")
    end)
    vm:load_elf(helper.guest_path("hello-long.elf"))
    local out = vm:run({ timeout = 5 })
    assert.are.same({ "hook_stop", "halted at the end" }, { out.reason, out.result })
    assert.are.equal("halted at the end", out.detail)
    assert.are.same({ helper.symbol("hello-long.elf", "halt_here") + 1 }, halts, "RIP is past the hlt")
    assert.are.equal(#"hello from elf64\n", vm:stats().ports[0x3F8])
  end)

  it("hears a triple fault", function()
    new_vm()
    local calls = 0
    vm:on_shutdown(function(ev)
      assert.are.equal("shutdown", ev.kind)
      calls = calls + 1
    end)
    vm:load_flat(helper.guest("triple-fault.bin"))
    assert.are.equal("shutdown", vm:run({ timeout = 5 }).reason)
    assert.are.equal(1, calls)
  end)

  it("checks hook limits", function()
    new_vm()
    -- Four debug registers, less the one SYSCALL completion holds where the host needs it.
    local capacity = vm.breakpoint_capacity
    assert.is_true(capacity == 3 or capacity == 4)
    for address = 1, capacity do
      vm:on_breakpoint(0x100000 + address, function() end)
    end
    local none = function() end
    assert.matches("^vmcore%.ConfigError: .*at most " .. capacity, helper.error_of(vm.on_breakpoint, vm, 0x200000, none))
    assert.matches("^vmcore%.ConfigError: .*CR5", helper.error_of(vm.on_cr, vm, 5, none))
    vm:load_flat(helper.guest("hello-long.bin"))
    vm:run({ timeout = 5 })
    assert.matches("^vmcore%.VmStateError: .*before the first run", helper.error_of(vm.on_cpuid, vm, 1, none))
  end)

  it("checks hook arguments", function()
    new_vm()
    local none = function() end
    local function config_error(pattern, f, ...)
      assert.matches("^vmcore%.ConfigError: .*" .. pattern, helper.error_of(f, vm, ...))
    end
    config_error("on_io needs a function", vm.on_io, 0x80)
    config_error("on_io needs a function", vm.on_io, 0x80, { write = true })
    config_error("unknown option \"sise\" in io hook options", vm.on_io, 0x80, { sise = 4 }, none)
    config_error("write must be true, false or \"both\"", vm.on_io, 0x80, { write = "sideways" }, none)
    config_error("not a range of I/O ports", vm.on_io, 0xFFFF, { size = 2 }, none)
    config_error("port must be at most 0xffff", vm.on_io, 0x10000, none)
    config_error("precise must be a boolean", vm.on_cpuid, 1, { precise = "yes" }, none)
    config_error("unknown option \"subleaf\" in msr hook options", vm.on_msr, 0x10, { subleaf = 1 }, none)
    assert.is_number(vm:on_io(0x80, { size = 4, write = "both" }, none))
    local mmio = vm:on_mmio(0xFEB00000, 0x1000, { write = false }, none)
    assert.is_true(vm:remove_hook(mmio))
    assert.is_false(vm:remove_hook(12345))
    assert.matches("bad self for vmcore.Vm:on_io", helper.error_of(vm.on_io, 0x80, none))
  end)

  it("refuses assignments to fields an event does not have", function()
    new_vm()
    local err
    vm:on_io(0x3F8, { write = true }, function(ev)
      err = select(2, pcall(function()
        ev.vlaue = 1
      end))
      assert.matches("^vmcore%.HookEvent %a+ vcpu=0 rip=0x%x+$", tostring(ev))
      ev:stop()
    end)
    vm:load_flat(helper.guest("hello-long.bin"))
    local out = vm:run({ timeout = 5 })
    assert.are.equal("hook_stop", out.reason)
    assert.are.equal("stopped by a hook", out.detail)
    assert.is_nil(out.result)
    assert.matches("hooks_spec%.lua:%d+: vmcore%.HookEvent has no field vlaue %(a hook assigns only ev%.value%)", err)
  end)

  describe("served while Lua waits", function()
    it("runs hooks during console:expect and wait", function()
      new_vm()
      local bytes = {}
      vm:on_io(0x3F8, { write = true }, function(ev)
        bytes[#bytes + 1] = string.char(ev.value)
      end)
      vm:load_flat(helper.guest("hello-long.bin"))
      vm:start({ timeout = 5 })
      vm.console:expect("hello from long mode", 5)
      assert.matches("^hello from long mode", table.concat(bytes))
      assert.are.equal("halted", vm:wait().reason)
      assert.are.equal("hello from long mode\n", table.concat(bytes))
    end)

    it("holds a VM's hooks until Lua waits for that VM", function()
      new_vm()
      local calls = 0
      vm:on_io(0x3F8, { write = true }, function()
        calls = calls + 1
      end)
      vm:load_flat(helper.guest("hello-long.bin"))
      vm:start({ timeout = 10 })
      -- Another VM runs to the end meanwhile; the first one's vCPU waits in its hook.
      local other <close> = helper.flat_vm("hello-long.bin")
      assert.are.equal("halted", other:run({ timeout = 5 }).reason)
      assert.are.equal(0, calls)
      assert.is_true(vm.is_running)
      assert.are.equal("halted", vm:wait().reason)
      assert.are.equal(#"hello from long mode\n", calls)
    end)

    it("refuses to wait for or start a VM from its own hook", function()
      new_vm()
      local errors = {}
      vm:on_io(0x3F8, { write = true }, function(ev)
        for _, call in ipairs({ "wait", "run", "start" }) do
          errors[call] = select(2, pcall(vm[call], vm))
        end
        errors.expect = select(2, pcall(vm.console.expect, vm.console, "x", 1))
        ev:stop("checked")
      end)
      vm:load_flat(helper.guest("hello-long.bin"))
      assert.are.equal("hook_stop", vm:run({ timeout = 5 }).reason)
      for _, call in ipairs({ "wait", "run", "start", "expect" }) do
        assert.matches("^vmcore%.VmStateError: cannot .* from inside one of its hooks", errors[call], nil, call)
      end
    end)

    it("refuses calls that need the run state in a static CPUID hook instead of hanging", function()
      new_vm()
      local err
      vm:on_cpuid(0x40000100, function(ev)
        err = select(2, pcall(function()
          return ev.vm.is_running
        end))
      end)
      vm:load_elf(helper.guest_path("cpuid.elf"))
      assert.are.equal("halted", vm:run({ timeout = 5 }).reason)
      assert.matches("^vmcore%.VmStateError: cannot .* from a static CPUID hook", err)
    end)

    it("closes promptly while a vCPU waits for a hook", function()
      local before = helper.resources()
      new_vm()
      local calls = 0
      vm:on_io(0x3F8, { write = true }, function()
        calls = calls + 1
      end)
      vm:load_flat(helper.guest("hello-long.bin"))
      vm:start({ timeout = 5 })
      busy(0.2) -- the vCPU reaches its first console write and waits for Lua
      assert.is_true(vm.is_running, "the vCPU waits in its hook (the guest would have halted by now)")
      local t0 = now()
      vm:close()
      vm = nil
      assert.is_true(now() - t0 < 2, "close returned promptly")
      assert.are.equal(0, calls, "the hook never ran")
      assert.are.same(before, helper.resources(before))
    end)

    it("collects an unreferenced VM whose vCPU waits for a hook that refers to it", function()
      local before = helper.resources()
      do
        local v = helper.flat_vm("hello-long.bin")
        v:on_io(0x3F8, { write = true }, function(ev)
          assert(v == ev.vm)
        end)
        v:start({ timeout = 5 })
        busy(0.2)
        assert.is_true(v.is_running, "the vCPU waits in its hook")
      end
      local t0 = now()
      collectgarbage("collect")
      collectgarbage("collect")
      assert.is_true(now() - t0 < 2, "collected promptly")
      assert.are.same(before, helper.resources(before))
    end)
  end)
end)
