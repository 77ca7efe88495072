-- vmcore.testing: the busted helpers, including what their failures look like.
local helper = require("helper")
require("vmcore")
local testing = require("vmcore.testing")

describe("vmcore.testing", function()
  it("boots a kernel, expects its output and checks the outcome", function()
    local vm <close> = testing.boot{kernel = helper.guest_path("mb-smp.elf"), vcpus = 2}
    local m = testing.expect(vm, "cpus (\\d+)") -- a Rust regex, as console:expect takes
    assert.are.equal("2", m.groups[1])
    local out = testing.assert_outcome(vm, "debug_exit", {code = 0x22})
    assert.are.equal(0x22, out.code)
  end)

  it("boots flat binaries", function()
    local vm <close> = testing.boot{kernel = helper.guest_path("hello-real.bin"), flat = "real", address = 0x10000}
    testing.expect(vm, "hello from real mode")
    testing.assert_outcome(vm, "halted")
  end)

  it("fails with the console tail", function()
    local vm <close> = testing.boot{kernel = helper.guest_path("hello-long.elf")}
    local ok, err = pcall(testing.assert_outcome, vm, "debug_exit")
    assert.is_false(ok)
    assert.truthy(err:find("expected outcome debug_exit, got halted", 1, true), err)
    assert.truthy(err:find("--- console tail ---\nhello from elf64", 1, true), err)
    ok, err = pcall(testing.expect, vm, "goodbye", 0.2)
    assert.is_false(ok)
    assert.truthy(err:find('expected "goodbye" on the console', 1, true), err)
    assert.truthy(err:find("hello from elf64", 1, true), err)
  end)
end)
