-- Guest state: registers, memory, address translation, exit counters.

-- helper.lua sits beside this file; finding it from here lets busted run from any directory.
package.path = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "?.lua;" .. package.path
local helper = require("helper")
local vmcore = helper.vmcore

describe("guest state", function()
  local vm

  before_each(function()
    vm = helper.flat_vm("hello-long.bin")
    assert.are.equal("halted", vm:run({ timeout = 5 }).reason)
  end)

  after_each(function()
    vm:close()
  end)

  it("reads and writes registers by name", function()
    local regs = vm.vcpus[0].regs
    assert.are.equal("integer", math.type(regs.rip))
    assert.is_true(regs.rip >= 0x100000 and regs.rip < 0x101000)
    regs.rax = 5
    assert.are.equal(5, regs.rax)
    regs.rbx = 0xffffffffffffffff -- u64 by bit pattern: this is the integer -1
    assert.are.equal(-1, regs.rbx)
    assert.are.equal(0x8, regs.cs)
  end)

  it("converts integral floats by bit pattern too", function()
    local regs = vm.vcpus[0].regs
    regs.rax = 2 ^ 63 -- a float; as a u64 it is 0x8000000000000000
    assert.are.equal(math.mininteger, regs.rax)
    regs.rax = 4096.0
    assert.are.equal(4096, regs.rax)
    assert.matches("^vmcore%.ConfigError: .*must be an integer", helper.error_of(function() regs.rax = 1.5 end))
    assert.matches("^vmcore%.ConfigError: .*must be an integer", helper.error_of(function() regs.rax = 2 ^ 64 end))
  end)

  it("rejects unknown registers and values that do not fit", function()
    local regs = vm.vcpus[0].regs
    assert.matches("^vmcore%.ConfigError: .*unknown register \"nosuch\"", helper.error_of(function() return regs.nosuch end))
    assert.matches("^vmcore%.ConfigError: .*unknown register", helper.error_of(function() regs.nosuch = 1 end))
    assert.matches("^vmcore%.ConfigError: .*does not fit", helper.error_of(function() regs.cs = 0x10000 end))
    assert.matches("^vmcore%.ConfigError: .*must be an integer", helper.error_of(function() regs.rax = "5" end))
  end)

  it("walks every register with pairs and as_table", function()
    local regs = vm.vcpus[0].regs
    local names = {}
    for name, value in pairs(regs) do
      names[#names + 1] = name
      assert.are.equal("integer", math.type(value))
    end
    assert.are.same(vmcore.REGISTER_NAMES, names)
    assert.are.equal(regs.rip, regs:as_table().rip)
    assert.matches("^vmcore.Registers vcpu=0 rip=0x", tostring(regs))
  end)

  it("numbers vCPUs from 0", function()
    assert.are.equal(1, vm.vcpu_count)
    assert.are.equal(1, #vm.vcpus)
    assert.are.equal(0, vm.vcpus[0].index)
    assert.is_nil(vm.vcpus[1])
    local err = helper.error_of(vm.read_virt, vm, 1, 0x100000, 1)
    assert.matches("^vmcore%.ConfigError: .*no vCPU 1", err)
  end)

  it("refuses registers of a running vCPU", function()
    local spinner = helper.flat_vm("spin.bin")
    spinner:start()
    spinner.console:expect("spinning")
    assert.matches("^vmcore%.VmStateError: vCPU 0 is running", helper.error_of(function() return spinner.vcpus[0].regs.rip end))
    spinner:stop()
    assert.are.equal("integer", math.type(spinner.vcpus[0].regs.rip))
    spinner:close()
  end)

  it("round-trips guest-physical memory", function()
    local data = "vmcore\0lua\255"
    vm:write_phys(0x200000, data)
    assert.are.equal(data, vm:read_phys(0x200000, #data))
    assert.are.equal(helper.guest("hello-long.bin"):sub(1, 8), vm:read_phys(0x100000, 8))
  end)

  it("refuses memory outside RAM", function()
    local size = vm.memory_size
    assert.matches("^vmcore%.GuestMemoryError: ", helper.error_of(vm.read_phys, vm, size, 1))
    assert.matches("^vmcore%.GuestMemoryError: ", helper.error_of(vm.write_phys, vm, size - 2, "abcd"))
    assert.matches("^vmcore%.GuestMemoryError: ", helper.error_of(vm.read_phys, vm, -1, 1))
    assert.matches("^vmcore%.GuestMemoryError: ", helper.error_of(vm.read_phys, vm, 0, size + 1))
  end)

  it("rejects negative lengths", function()
    assert.matches("^vmcore%.ConfigError: .*length must be >= 0", helper.error_of(vm.read_phys, vm, 0, -1))
  end)

  it("reads virtual memory through the identity map", function()
    assert.are.equal(0x100000, vm:translate(0, 0x100000))
    assert.are.equal(vm:read_phys(0x100000, 16), vm:read_virt(0, 0x100000, 16))
    vm:write_virt(0, 0x300000, "virt")
    assert.are.equal("virt", vm:read_phys(0x300000, 4))
  end)

  it("counts exits", function()
    local stats = vm:stats()
    assert.is_true(stats.exits.io_out > 0)
    local total = 0
    for _, n in pairs(stats.exits) do
      total = total + n
    end
    assert.are.equal(total, stats.exits_total)
    assert.are.equal("table", type(stats.unhandled_port_reads))
  end)

  it("keeps the whole console output", function()
    assert.are.equal("hello from long mode\n", vm.console.output)
    assert.are.equal(vm.console.output, vm.console.output_bytes)
    assert.matches("hello from long mode", vm.console:tail())
  end)

  it("parses memory sizes like the constructor", function()
    assert.are.equal(64 * 1024 * 1024, vmcore.parse_memory_size("64M"))
    assert.are.equal(1 << 30, vmcore.parse_memory_size("1G"))
    assert.are.equal("string", type(vmcore.version))
  end)
end)
