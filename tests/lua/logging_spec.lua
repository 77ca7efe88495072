-- The core's log records, as Lua sees them: vmcore.set_log_level and vmcore.logs.

package.path = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "?.lua;" .. package.path
local helper = require("helper")
local vmcore = helper.vmcore

describe("logging", function()
  after_each(function()
    vmcore.set_log_level("warn")
    vmcore.logs()
  end)

  it("keeps the records of a run at the level asked for", function()
    vmcore.set_log_level("info")
    vmcore.logs() -- start from an empty queue
    local vm = helper.flat_vm("hello-long.bin")
    assert.are.equal("halted", vm:run({ timeout = 5 }).reason)
    vm:close()
    local records, dropped = vmcore.logs()
    assert.are.equal(0, dropped)
    local ended
    for _, r in ipairs(records) do
      assert.truthy(r.target:match("^vmcore"))
      if r.message:match("^run ended: halted") then
        ended = r
      end
    end
    assert.is_not_nil(ended, "no 'run ended' record among " .. #records)
    assert.are.equal("info", ended.level)
    assert.are.equal(0, #vmcore.logs(), "logs() takes what it returns")
  end)

  it("records nothing below the level", function()
    vmcore.set_log_level("error")
    vmcore.logs()
    local vm = helper.flat_vm("hello-long.bin")
    vm:run({ timeout = 5 })
    vm:close()
    assert.are.equal(0, #vmcore.logs())
  end)

  it("refuses unknown levels", function()
    local ok, err = pcall(vmcore.set_log_level, "loud")
    assert.is_false(ok)
    assert.matches("unknown log level", err)
  end)
end)
