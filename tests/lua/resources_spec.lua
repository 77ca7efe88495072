-- Closing a VM (explicitly, with <close>, or by garbage collection) frees its threads and file
-- descriptors.

-- helper.lua sits beside this file; finding it from here lets busted run from any directory.
package.path = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "?.lua;" .. package.path
local helper = require("helper")
local vmcore = helper.vmcore

local function run_hello()
  local vm = helper.flat_vm("hello-long.bin")
  assert.are.equal("halted", vm:run({ timeout = 5 }).reason)
  return vm
end

describe("resources", function()
  setup(function()
    -- One VM first, so one-time process set-up (signal handlers and the like) is not counted.
    run_hello():close()
  end)

  it("frees threads and fds on close", function()
    local before = helper.resources()
    for _ = 1, 5 do
      run_hello():close()
    end
    assert.are.same(before, helper.resources(before))
  end)

  it("frees a running VM on close", function()
    local before = helper.resources()
    local vm = helper.flat_vm("spin.bin")
    vm:start()
    vm.console:expect("spinning")
    assert.is_true(helper.resources().threads > before.threads)
    vm:close()
    assert.are.same(before, helper.resources(before))
  end)

  it("closes a <close> variable at the end of its scope", function()
    local before = helper.resources()
    local console
    do
      local vm <close> = helper.flat_vm("spin.bin")
      vm:start()
      console = vm.console
      console:expect("spinning")
    end
    assert.are.same(before, helper.resources(before))
    assert.matches("^vmcore%.VmStateError: the VM is closed", helper.error_of(function() return console.output end))
  end)

  it("frees unreferenced VMs when they are collected", function()
    local before = helper.resources()
    for _ = 1, 5 do
      run_hello()
    end
    collectgarbage("collect")
    collectgarbage("collect")
    assert.are.same(before, helper.resources(before))
  end)
end)
