-- Multiboot kernels from Lua: vm:load_multiboot(path, {cmdline=..., modules={...}}).
local helper = require("helper")
local vmcore = require("vmcore")

describe("multiboot kernels", function()
  it("get their command line, modules and boot information", function()
    local vm <close> = vmcore.Vm{memory = "64M"}
    local exit_elf = helper.guest_path("mb-exit.elf")
    vm:load_multiboot(helper.guest_path("mb-info.elf"), {
      cmdline = "hello world",
      modules = {{exit_elf, "arg1"}, helper.guest_path("mb-rtc.elf")},
    })
    local out = vm:run{timeout = 30}
    assert.are.equal("debug_exit", out.reason)
    assert.are.equal(0x10, out.code)
    local text = vm.console.output
    assert.truthy(text:find("magic ok\n", 1, true))
    assert.truthy(text:find("cmdline " .. helper.guest_path("mb-info.elf") .. " hello world\n", 1, true))
    assert.truthy(text:find("mods 2\n", 1, true))
    assert.truthy(text:find(exit_elf .. " arg1 .ELF", 1, true))
  end)

  it("start application processors and read the CPU count from fw_cfg", function()
    for _, cpus in ipairs({2, 3}) do
      local vm <close> = vmcore.Vm{memory = "64M", vcpus = cpus}
      vm:load_kernel(helper.guest_path("mb-smp.elf"))
      local out = vm:run{timeout = 30}
      assert.are.equal(0x20 + cpus, out.code)
      assert.truthy(vm.console.output:find("all " .. cpus .. " cpus up", 1, true))
    end
  end)

  it("power off through ACPI S5 and reset through the 8042 or the ACPI reset register", function()
    local found = "rsdp rev 2\nxsdt 2 entries\nfadt rev 6\nsmi_cmd 0x0\ndsdt from x_dsdt\n"
      .. "pm1a_cnt 0x604\ns5 slp_typ 5\n"
    for _, case in ipairs({
      {"poweroff", "poweroff", "poweroff\n"},
      {"kbd-reset", "reboot", "reset through the 8042\n"},
      {"acpi-reset", "reboot", "reset register 0xcf9 value 0x6\n"},
    }) do
      local action, reason, last = case[1], case[2], case[3]
      local vm <close> = vmcore.Vm{memory = "64M"}
      vm:load_multiboot(helper.guest_path("mb-power.elf"), {cmdline = action})
      local out = vm:run{timeout = 30}
      assert.are.equal(reason, out.reason, vm.console.output)
      assert.are.equal(found .. last, vm.console.output)
    end
  end)

  it("refuse a kernel without a header, with the reason", function()
    local vm <close> = vmcore.Vm{memory = "64M"}
    local ok, err = pcall(vm.load_multiboot, vm, helper.guest_path("hello-long.elf"))
    assert.is_false(ok)
    assert.truthy(tostring(err):find("vmcore.LoadError", 1, true))
    assert.truthy(tostring(err):find("no multiboot header", 1, true))
  end)

  it("offer a monotonic clock", function()
    local t0 = vmcore.monotonic()
    assert.is_true(vmcore.monotonic() >= t0)
  end)
end)
