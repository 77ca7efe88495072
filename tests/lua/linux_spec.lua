-- Linux images from Lua: what a bad kernel file says, and what loading the Debian kernel that
-- scripts/linux-guest installs reports. (Booting it is the Python suite's slow test.)

package.path = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "?.lua;" .. package.path
local helper = require("helper")
local vmcore = helper.vmcore

local kernel_path = os.getenv("VMCORE_LINUX_KERNEL") or (helper.root .. "/target/linux/vmlinuz")

local function read_all(path)
  local f = io.open(path, "rb")
  if not f then
    return nil
  end
  local data = f:read("a")
  f:close()
  return data
end

describe("Linux kernels", function()
  local vm

  before_each(function()
    vm = vmcore.Vm({ memory = "256M" })
  end)

  after_each(function()
    vm:close()
    helper.cleanup()
  end)

  it("says a text file is not a Linux kernel", function()
    local path = helper.temp_file("#!/bin/sh\necho this is not a kernel\n")
    local err = helper.error_of(vm.load_linux, vm, path)
    assert.matches("^vmcore%.LoadError: ", err)
    assert.matches("not a Linux kernel", err)
  end)

  it("refuses bad options before reading anything", function()
    assert.matches("protocol", helper.error_of(vm.load_linux, vm, "/nonexistent", { protocol = "efi" }))
    assert.matches("decompress must be a boolean", helper.error_of(vm.load_linux, vm, "/x", { decompress = "yes" }))
  end)

  local image = read_all(kernel_path)
  if not image then
    pending("no Linux kernel at " .. kernel_path .. ": run scripts/linux-guest")
    return
  end

  it("reports a truncated kernel as a LoadError", function()
    local path = helper.temp_file(image:sub(1, #image // 2))
    local err = helper.error_of(vm.load_linux, vm, path)
    assert.matches("^vmcore%.LoadError: ", err)
    assert.matches("truncated", err)
  end)

  it("loads the Debian kernel with its payload decompressed on the host", function()
    local k = vm:load_linux(kernel_path, { cmdline = "console=ttyS0 quiet" })
    assert.equals("bzImage", k.format)
    assert.truthy(({ gzip = true, xz = true, lz4 = true, zstd = true })[k.compression])
    assert.truthy(k.protocol == "pvh" or k.protocol == "linux64")
    assert.truthy(k.kernel[2] > k.kernel[1])
  end)
end)
