-- Errors: each is a string "vmcore.<Kind>: <core message>".

-- helper.lua sits beside this file; finding it from here lets busted run from any directory.
package.path = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "?.lua;" .. package.path
local helper = require("helper")
local vmcore = helper.vmcore

describe("errors", function()
  local vm

  before_each(function()
    vm = vmcore.Vm({ memory = "16M" })
  end)

  after_each(function()
    vm:close()
    helper.cleanup()
  end)

  it("reports a truncated ELF as a LoadError", function()
    local path = helper.temp_file(helper.guest("hello-long.elf"):sub(1, 100))
    local err = helper.error_of(vm.load_elf, vm, path)
    assert.matches("^vmcore%.LoadError: cannot load ELF ", err)
  end)

  it("says a text file is not an ELF", function()
    local path = helper.temp_file("#!/bin/sh\necho this is not an ELF file\n")
    local err = helper.error_of(vm.load_elf, vm, path)
    assert.matches("^vmcore%.LoadError: ", err)
    assert.matches("not an ELF", err)
  end)

  it("reports a missing file as a VmIOError", function()
    local err = helper.error_of(vm.load_elf, vm, "/nonexistent/guest.elf")
    assert.matches("^vmcore%.VmIOError: cannot read /nonexistent/guest.elf", err)
  end)

  it("refuses to run before anything is loaded", function()
    assert.matches("^vmcore%.VmStateError: nothing to run", helper.error_of(vm.run, vm))
    assert.matches("^vmcore%.VmStateError: ", helper.error_of(vm.wait, vm))
  end)

  it("rejects bad configuration", function()
    assert.matches("^vmcore%.ConfigError: .*memory size", helper.error_of(vmcore.Vm, { memory = "lots" }))
    assert.matches("^vmcore%.ConfigError: .*vcpus", helper.error_of(vmcore.Vm, { vcpus = 0 }))
    assert.matches("^vmcore%.ConfigError: .*unknown option \"memroy\"", helper.error_of(vmcore.Vm, { memroy = "1M" }))
    assert.matches("^vmcore%.ConfigError: .*unknown CPU mode", helper.error_of(vm.load_flat, vm, "\244", { mode = "weird" }))
    assert.matches("^vmcore%.ConfigError: .*code must be a string", helper.error_of(vm.load_flat, vm, 42))
    assert.matches("^vmcore%.ConfigError: .*timeout", helper.error_of(vm.run, vm, { timeout = -1 }))
    assert.matches("^vmcore%.ConfigError: .*timeout", helper.error_of(vm.run, vm, 0 / 0))
    assert.matches("^vmcore%.ConfigError: .*timeout", helper.error_of(vm.start, vm, "soon"))
    assert.matches("^vmcore%.ConfigError: ", helper.error_of(vmcore.parse_memory_size, "64X"))
  end)

  it("times out an expect with the console tail", function()
    vm:load_flat(helper.guest("spin.bin"))
    vm:start()
    local err = helper.error_of(vm.console.expect, vm.console, "never printed", 0.2)
    assert.matches("^vmcore%.ConsoleTimeout: no match for \"never printed\"", err)
    assert.matches("spinning", err)
    vm:stop()
  end)

  it("says when the console closed before a match", function()
    vm:load_flat(helper.guest("hello-long.bin"))
    vm:run({ timeout = 5 })
    local err = helper.error_of(vm.console.expect, vm.console, "never printed", 5)
    assert.matches("^vmcore%.ConsoleClosed: ", err)
    assert.matches("halted", err)
  end)

  it("rejects an invalid pattern as a ConfigError", function()
    assert.matches("^vmcore%.ConfigError: invalid pattern", helper.error_of(vm.console.expect, vm.console, "(", 0))
  end)

  it("refuses everything but close on a closed VM", function()
    local console, regs = vm.console, vm.vcpus[0].regs
    vm:close()
    vm:close()
    assert.is_true(vm.closed)
    assert.matches("^vmcore%.VmStateError: the VM is closed", helper.error_of(vm.run, vm))
    assert.matches("^vmcore%.VmStateError: ", helper.error_of(function() return vm.memory_size end))
    assert.matches("^vmcore%.VmStateError: ", helper.error_of(function() return console.output end))
    assert.matches("^vmcore%.VmStateError: ", helper.error_of(function() return regs.rip end))
    assert.are.equal("vmcore.Vm (closed)", tostring(vm))
  end)

  it("points out a method called with '.' instead of ':'", function()
    assert.matches("use obj:run", helper.error_of(function() return vm.run({ timeout = 1 }) end))
  end)

  it("keeps its fields read-only", function()
    assert.matches("read%-only", helper.error_of(function() vm.console = nil end))
    assert.matches("read%-only", helper.error_of(function() vm.vcpus[3] = {} end))
  end)
end)
