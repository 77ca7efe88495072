-- Virtio devices from Lua: disks, entropy and network devices, driven by the mmio-script guest
-- (which replays the register writes a driver makes), with a Lua on_packet filter served while
-- the script waits for its VMs.

package.path = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "?.lua;" .. package.path
local helper = require("helper")
local vmcore = helper.vmcore

local SCRIPT, QUEUE, QUEUE_SIZE, HEADER, DATA = 0x200000, 0x300000, 8, 0x310000, 0x311000
local MB32 = 32 * 1024 * 1024

local function rings(n)
  local desc = QUEUE + 0x1000 * n
  return desc, desc + 16 * QUEUE_SIZE, desc + 0x800
end

-- The program the mmio-script guest runs: 16-byte entries (address, value, op).
local function script()
  local ops = {}
  local s = {}
  function s.write(address, value)
    ops[#ops + 1] = string.pack("<I8I4I4", address, value, 1)
  end
  function s.wait16(address, value)
    ops[#ops + 1] = string.pack("<I8I4I4", address, value, 2)
  end
  function s.bring_up(base, queues)
    s.write(base + 0x70, 3)
    s.write(base + 0x24, 1)
    s.write(base + 0x20, 1)
    s.write(base + 0x70, 3 | 8)
    for i, n in ipairs(queues) do
      local desc, avail, used = rings(n)
      s.write(base + 0x30, i - 1)
      s.write(base + 0x38, QUEUE_SIZE)
      for _, reg in ipairs({ { 0x80, desc }, { 0x90, avail }, { 0xa0, used } }) do
        s.write(base + reg[1], reg[2])
        s.write(base + reg[1] + 4, 0)
      end
      s.write(base + 0x44, 1)
    end
    s.write(base + 0x70, 3 | 8 | 4)
  end
  function s.load(vm)
    ops[#ops + 1] = string.pack("<I8I4I4", 0, 0, 0)
    vm:write_phys(SCRIPT, table.concat(ops))
  end
  return s
end

local function desc(vm, n, index, addr, len, flags, next)
  vm:write_phys((rings(n)) + 16 * index, string.pack("<I8I4I2I2", addr, len, flags, next or 0))
end

local function frame(tag, len)
  return string.rep("\xff", 6) .. string.char(2, 0, 0, 0, 0, tag) .. "\x88\xb5" .. string.rep(string.char(tag), len - 14)
end

-- Loads a guest that brings `net` up, posts a receive buffer at DATA, sends `send` if given, and
-- ends once the receive buffer is used.
local function net_guest(vm, net, send)
  local s = script()
  s.bring_up(net.base, { 0, 1 })
  s.write(net.base + 0x50, 0)
  if send then
    vm:write_phys(HEADER, string.rep("\0", 12) .. send)
    desc(vm, 1, 0, HEADER, 12 + #send, 0)
    vm:write_phys(select(2, rings(1)) + 2, string.pack("<I2", 1))
    s.write(net.base + 0x50, 1)
  end
  s.wait16(select(3, rings(0)) + 2, 1)
  s.load(vm)
  desc(vm, 0, 0, DATA, 2048, 2)
  vm:write_phys(select(2, rings(0)) + 2, string.pack("<I2", 1))
  vm:load_flat(helper.guest("mmio-script.bin"))
end

local function received(vm, len)
  local used = string.unpack("<I4", vm:read_phys(select(3, rings(0)) + 8, 4))
  assert.are.equal(12 + len, used)
  return vm:read_phys(DATA + 12, len)
end

describe("virtio devices", function()
  local vms = {}

  local function new_vm()
    local vm = vmcore.Vm({ memory = MB32 })
    vms[#vms + 1] = vm
    return vm
  end

  after_each(function()
    for _, vm in ipairs(vms) do
      vm:close()
    end
    vms = {}
    helper.cleanup()
  end)

  it("adds disks and an entropy device and describes them", function()
    local vm = new_vm()
    local image = helper.temp_file(string.rep("\1", 4096))
    local disk = vm:add_disk(image, { readonly = true, serial = "lua-disk" })
    assert.are.same({ 0, "block", 0xD0000000, 16 }, { disk.index, disk.kind, disk.base, disk.gsi })
    assert.are.equal("rng", vm:add_rng().kind)
    assert.are.equal(2, #vm.virtio_devices)
    local err = helper.error_of(function()
      vm:add_disk(image, { serial = string.rep("x", 21) })
    end)
    assert.truthy(err:find("^vmcore.ConfigError: .*at most 20 bytes"))
    assert.truthy(helper.error_of(function()
      vm:add_disk(image, { readonly = "yes" })
    end):find("readonly must be a boolean"))
  end)

  it("links two VMs and filters frames with a Lua function", function()
    local a, b = new_vm(), new_vm()
    local seen = {}
    local a_net = a:add_net({ mac = "02:00:00:00:00:0a", on_packet = function(f)
      seen[#seen + 1] = f
    end })
    local b_net = b:add_net()
    assert.are.equal("02:00:00:00:00:0a", a_net.mac)
    a_net:link(b_net)
    net_guest(a, a_net, frame(0xA1, 64))
    net_guest(b, b_net, frame(0xB2, 100))
    a:start(20)
    b:start(20)
    assert.are.equal("debug_exit", a:wait().reason)
    assert.are.equal("debug_exit", b:wait().reason)
    assert.are.equal(frame(0xB2, 100), received(a, 100))
    assert.are.equal(frame(0xA1, 64), received(b, 64))
    assert.are.same({ frame(0xA1, 64) }, seen)
    assert.are.same({ tx_frames = 1, tx_dropped = 0, rx_frames = 1, rx_dropped = 0 }, a_net.stats)
  end)

  it("drops what a filter refuses, and injects frames", function()
    local a, b = new_vm(), new_vm()
    local a_net, b_net = a:add_net({ on_packet = function()
      return false
    end }), b:add_net()
    a_net:link(b_net)
    net_guest(a, a_net, frame(1, 60))
    net_guest(b, b_net)
    a:start(20)
    b:start(1)
    -- A's filter is asked while this thread waits for A; B never gets the frame.
    assert.are.equal("timeout", b:wait().reason)
    a_net:inject(frame(7, 70))
    assert.are.equal("debug_exit", a:wait().reason)
    assert.are.equal(frame(7, 70), received(a, 70))
    assert.are.equal(1, a_net.stats.tx_dropped)
    assert.are.equal(0, b_net.stats.rx_frames)
    local err = helper.error_of(function()
      b_net:inject("short")
    end)
    assert.truthy(err:find("^vmcore.ConfigError: .*14 to 1518 bytes"))
  end)

  it("carries text both ways on a virtio console", function()
    local vm = new_vm()
    local hvc = vm:add_console()
    local device = vm.virtio_devices[1]
    assert.are.equal("console", device.kind)
    local s = script()
    s.bring_up(device.base, { 0, 1 })
    vm:write_phys(HEADER, "hello from hvc0\n")
    desc(vm, 1, 0, HEADER, 16, 0)
    vm:write_phys(select(2, rings(1)) + 2, string.pack("<I2", 1))
    s.write(device.base + 0x50, 1)
    s.wait16(select(3, rings(0)) + 2, 1)
    s.load(vm)
    desc(vm, 0, 0, DATA, 64, 2)
    vm:write_phys(select(2, rings(0)) + 2, string.pack("<I2", 1))
    vm:load_flat(helper.guest("mmio-script.bin"))
    vm:start(20)
    assert.are.equal("hvc0", hvc:expect("hello from (\\w+)", 10).groups[1])
    hvc:send("typed")
    assert.are.equal("debug_exit", vm:wait().reason)
    assert.are.equal("typed", vm:read_phys(DATA, 5))
    assert.is_nil(vm.console.output:find("hvc0"))
  end)
end)
