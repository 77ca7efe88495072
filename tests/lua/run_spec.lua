-- Running guests: every entry mode, both ELF classes, and every way a run ends.

-- helper.lua sits beside this file; finding it from here lets busted run from any directory.
package.path = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "?.lua;" .. package.path
local helper = require("helper")
local vmcore = helper.vmcore

describe("running guests", function()
  local vm

  after_each(function()
    if vm then
      vm:close()
      vm = nil
    end
  end)

  local function runs_and_prints(name, load_opts, line)
    vm = helper.flat_vm(name, load_opts)
    local out = vm:run({ timeout = 5 })
    assert.are.equal("halted", out.reason)
    assert.are.equal(line, vm.console:expect(line, 5).text)
  end

  it("runs a long-mode flat guest", function()
    runs_and_prints("hello-long.bin", nil, "hello from long mode")
  end)

  it("runs a real-mode flat guest", function()
    runs_and_prints("hello-real.bin", { address = 0x10000, mode = "real" }, "hello from real mode")
  end)

  it("runs a protected-mode flat guest", function()
    runs_and_prints("hello-prot.bin", { address = 0x100000, mode = "protected" }, "hello from protected mode")
  end)

  it("returns the entry address from load_flat", function()
    vm = vmcore.Vm({ memory = 32 * 1024 * 1024 })
    assert.are.equal(0x100000, vm:load_flat(helper.guest("hello-long.bin")))
    assert.are.equal(0x10000, vm:load_flat(helper.guest("hello-real.bin"), { address = 0x10000, mode = "real" }))
    assert.are.equal(32 * 1024 * 1024, vm.memory_size)
  end)

  for _, case in ipairs({
    { file = "hello-prot.elf", line = "hello from elf32" },
    { file = "hello-long.elf", line = "hello from elf64" },
  }) do
    it("loads and runs " .. case.file, function()
      vm = vmcore.Vm({ memory = "64M" })
      assert.are.equal(0x100000, vm:load_elf(helper.guest_path(case.file)))
      assert.are.equal("halted", vm:run({ timeout = 5 }).reason)
      assert.are.equal(case.line .. "\n", vm.console.output)
    end)
  end

  it("keeps only the newest console_limit bytes of a guest printing forever", function()
    vm = vmcore.Vm{ memory = "16M", console_limit = 4096 }
    -- mov dx, 0x3f8; mov al, 'A'; 1: out dx, al; jmp 1b
    vm:load_flat("\x66\xba\xf8\x03\xb0\x41\xee\xeb\xfd")
    assert.equals("timeout", vm:run({ timeout = 1 }).reason)
    local kept, dropped = #vm.console.output_bytes, vm.console.dropped
    assert.is_true(dropped > 0 and kept >= 4096 and kept <= 4096 + 512, kept .. " kept, " .. dropped .. " dropped")
    assert.equals(string.rep("A", kept), vm.console.output)
    assert.equals(dropped, vm:stats().console_dropped)
  end)

  it("reports a debug exit with its code", function()
    vm = helper.flat_vm("debug-exit.bin")
    local out = vm:run({ timeout = 5 })
    assert.are.equal("debug_exit", out.reason)
    assert.are.equal(0x31, out.code)
    assert.are.equal((0x31 << 1) | 1, out.qemu_exit_status)
    assert.are.equal(out.summary, tostring(out))
    assert.matches("^debug_exit code=0x31", tostring(out))
    vm.console:expect("exiting with 0x31")
  end)

  it("counts instructions vmcore emulated for KVM", function()
    -- emulate.elf case 1: an int3 at CPL0 reaches the guest's own handler. Where KVM's emulator
    -- cannot run it (kvm_pvm), vmcore emulates it and counts it by mnemonic.
    vm = vmcore.Vm({ memory = "32M" })
    vm:load_elf(helper.guest_path("emulate.elf"))
    vm:write_phys(0x300000, string.pack("<I8", 1))
    local out = vm:run({ timeout = 5 })
    assert.are.equal("debug_exit", out.reason)
    assert.are.equal(0x10, out.code)
    local emulated = vm:stats().emulated
    assert.are.equal("table", type(emulated))
    for name, count in pairs(emulated) do
      assert.are.same({ "int3", 1 }, { name, count })
    end
  end)

  it("reports a triple fault as shutdown", function()
    vm = helper.flat_vm("triple-fault.bin")
    local out = vm:run({ timeout = 5 })
    assert.are.equal("shutdown", out.reason)
    assert.is_nil(out.code)
    vm.console:expect("faulting")
  end)

  it("ends a spinning guest at its timeout", function()
    vm = helper.flat_vm("spin.bin")
    local before = os.time()
    local out = vm:run({ timeout = 1 })
    local elapsed = os.time() - before
    assert.are.equal("timeout", out.reason)
    assert.is_true(elapsed <= 2, "the run took about " .. elapsed .. " s")
    vm.console:expect("spinning")
    assert.is_false(vm.is_running)
    assert.are.equal("timeout", vm.outcome.reason)
  end)

  it("talks to the echo guest and stops it", function()
    vm = helper.flat_vm("echo.bin")
    vm:start({ timeout = 10 })
    assert.is_true(vm.is_running)
    vm.console:expect("ready")
    vm.console:send("ping\n")
    local m = vm.console:expect("p(i)(?P<rest>ng)")
    assert.are.equal("ping", m.text)
    assert.are.equal("i", m.groups[1])
    assert.are.equal("ng", m.groups[2])
    assert.are.equal(2, m.groups.n)
    assert.are.equal("ng", m.named.rest)
    assert.are.equal("ping", vm.console.output_bytes:sub(m.start, m["end"]))
    assert.is_nil(vm:wait(0.05))
    local out = vm:stop()
    assert.are.equal("stopped", out.reason)
    assert.is_false(vm.is_running)
    assert.are.equal("stopped", vm:wait().reason)
  end)

  it("can start again after a stop", function()
    vm = helper.flat_vm("spin.bin")
    vm:start()
    assert.are.equal("stopped", vm:stop().reason)
    vm:start(0.2)
    assert.are.equal("timeout", vm:wait(5).reason)
  end)

  it("takes math.huge as no timeout", function()
    vm = helper.flat_vm("hello-long.bin")
    assert.are.equal("halted", vm:run({ timeout = math.huge }).reason)
    assert.are.equal("halted", vm:wait(math.huge).reason)
    vm.console:expect("long mode", math.huge)
  end)

  it("returns nil from stop when the VM never ran", function()
    vm = vmcore.Vm()
    assert.is_nil(vm:stop())
    assert.is_nil(vm.outcome)
  end)

  it("tees console output to a file", function()
    local log = os.tmpname()
    vm = vmcore.Vm({ tee = log })
    vm:load_flat(helper.guest("hello-long.bin"))
    vm:run({ timeout = 5 })
    vm:close()
    vm = nil
    local f = assert(io.open(log, "rb"))
    local text = f:read("a")
    f:close()
    os.remove(log)
    assert.are.equal("hello from long mode\n", text)
  end)
end)
