-- Guest RIP sampling from Lua: the same core sampler and symbol maps as Python's vm.profile.

package.path = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "?.lua;" .. package.path
local helper = require("helper")
local vmcore = helper.vmcore

describe("profile", function()
  local vm

  before_each(function()
    vm = vmcore.Vm({ memory = "16M" })
  end)

  after_each(function()
    vm:close()
    helper.cleanup()
  end)

  it("samples the loop a spinning guest is in and names it from a symbol map", function()
    local entry = vm:load_flat(helper.guest("spin.bin"))
    vm:sample_rip(true)
    vm:run({ timeout = 0.5 })
    local busiest, most, total = nil, 0, 0
    for rip, count in pairs(vm:rip_samples()) do
      total = total + count
      if count > most then busiest, most = rip, count end
    end
    assert.is_true(total >= 10)
    assert.are.equal("\235\254", vm:read_virt(0, busiest, 2)) -- jmp to itself
    local map = helper.temp_file(string.format("%016x T _start\n%016x t spin\n", entry, busiest))
    local profile = vm:profile(map)
    assert.are.equal("spin", profile[1].func)
    assert.are.equal(most, profile[1].samples)
    vm:clear_rip_samples()
    assert.are.same({}, vm:rip_samples())
  end)

  it("refuses a file that is not a symbol map", function()
    local err = helper.error_of(vm.profile, vm, helper.temp_file("#!/bin/sh\necho hello\n"))
    assert.matches("^vmcore%.ConfigError: .*symbol map line 1", err)
  end)
end)
