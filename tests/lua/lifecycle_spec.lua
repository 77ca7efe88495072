-- The VM's life from Lua: runs that time out and continue, pause and resume, stop, pause and
-- close from inside a hook, the state names, VMs freed by the garbage collector although their
-- hooks refer to them, and a seeded stress of random operations where every call must return
-- within two seconds.

-- helper.lua sits beside this file; finding it from here lets busted run from any directory.
package.path = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "?.lua;" .. package.path
local helper = require("helper")
local vmcore = helper.vmcore
local now = vmcore.monotonic

-- Where count.bin keeps its counter (a little-endian u64).
local COUNTER = 0x180000
local SERIAL = 0x3F8
-- The longest any lifecycle call may take.
local PROMPT = 2

local function counter(vm)
  return (string.unpack("<I8", vm:read_phys(COUNTER, 8)))
end

local function counting_vm()
  local vm = vmcore.Vm({ memory = "32M" })
  vm:load_flat(helper.guest("count.bin"))
  return vm
end

-- Calls f(...), asserts it returned within PROMPT seconds, and returns what it returned.
local function promptly(what, f, ...)
  local started = now()
  local results = table.pack(f(...))
  local took = now() - started
  assert(took < PROMPT, ("%s took %.2f s"):format(what, took))
  return table.unpack(results, 1, results.n)
end

describe("lifecycle", function()
  setup(function()
    -- One VM first, so one-time process set-up (signal handlers and the like) is not counted.
    local vm = helper.flat_vm("hello-long.bin", nil, { memory = "32M" })
    vm:run({ timeout = 5 })
    vm:close()
  end)

  it("continues the same guest after each of 20 runs that timed out", function()
    local vm <close> = counting_vm()
    local last = 0
    for round = 1, 20 do
      local out = promptly("run", vm.run, vm, { timeout = 0.01 })
      assert.are.equal("timeout", out.reason, "round " .. round)
      assert.are.equal("ended", vm.state)
      local n = counter(vm)
      assert(n >= last, ("round %d: the counter went back from %d to %d: the guest restarted"):format(round, last, n))
      last = n
    end
    assert(last > 0, "the guest never counted")
    assert.are.equal("counting\n", vm.console.output:match("^counting\n"))
    assert.are.equal(1, select(2, vm.console.output:gsub("counting", "")), "the guest started once")
  end)

  it("names each state of a VM's life", function()
    local vm <close> = vmcore.Vm({ memory = "32M" })
    assert.are.equal("created", vm.state)
    assert.matches("^vmcore%.VmStateError: only a running VM can pause; this one is created", helper.error_of(vm.pause, vm))
    vm:load_flat(helper.guest("count.bin"))
    assert.are.equal("loaded", vm.state)
    assert.matches("^vmcore%.VmStateError: only a paused VM can resume; this one is loaded", helper.error_of(vm.resume, vm))
    vm:start()
    assert.are.equal("running", vm.state)
    assert.matches("^vmcore%.VmStateError: the VM is already running", helper.error_of(vm.start, vm))
    promptly("pause", vm.pause, vm)
    assert.are.equal("paused", vm.state)
    assert.are.equal("paused", vm.outcome.reason)
    assert.matches(" paused", tostring(vm))
    promptly("pause", vm.pause, vm) -- pausing a paused VM does nothing
    assert.are.equal("integer", math.type(vm.vcpus[0].regs.rip), "registers are readable while paused")
    promptly("resume", vm.resume, vm)
    assert.are.equal("running", vm.state)
    assert.are.equal("stopped", promptly("stop", vm.stop, vm).reason)
    assert.are.equal("ended", vm.state)
    assert.are.equal("timeout", promptly("run", vm.run, vm, { timeout = 0.01 }).reason, "a stopped guest runs on")
    vm:start()
    promptly("pause", vm.pause, vm)
    assert.are.equal("stopped", promptly("stop", vm.stop, vm).reason, "stopping a paused VM ends it")
    assert.are.equal("ended", vm.state)
    vm:close()
    assert.are.equal("closed", vm.state)
    for _, call in ipairs({ "start", "run", "pause", "resume" }) do
      assert.matches("^vmcore%.VmStateError: the VM is closed", helper.error_of(vm[call], vm), nil, call)
    end

    local halting <close> = helper.flat_vm("hello-long.bin", nil, { memory = "32M" })
    assert.are.equal("halted", halting:run({ timeout = 5 }).reason)
    assert.are.equal("ended", halting.state)
    assert.matches("^vmcore%.VmStateError: the VM has ended %(halted", helper.error_of(halting.start, halting))
  end)

  it("ends the run with reason stopped when a hook calls stop()", function()
    local vm <close> = counting_vm()
    local called, returned, state_in_hook = false, nil, nil
    vm:on_io(SERIAL, { write = true }, function()
      if not called then
        called = true
        returned = promptly("stop from a hook", vm.stop, vm)
        state_in_hook = vm.state
      end
    end)
    local out = promptly("run", vm.run, vm, { timeout = 30 })
    assert.are.equal("stopped", out.reason)
    assert.is_true(called)
    assert.is_nil(returned, "stop from a hook returns before the run has ended")
    assert.are.equal("running", state_in_hook, "the run ends when the hook returns")
    assert.are.equal("ended", vm.state)
    assert.are.equal("c", vm.console.output, "the run ended after the hook's character")
  end)

  it("pauses from a hook, and resume() continues the same guest", function()
    local vm <close> = counting_vm()
    local paused, state_in_hook = false, nil
    vm:on_io(SERIAL, { write = true }, function(ev)
      if not paused then
        paused = true
        promptly("pause from a hook", ev.vm.pause, ev.vm)
        state_in_hook = vm.state
      end
    end)
    local out = promptly("run", vm.run, vm, { timeout = 30 })
    assert.are.equal("paused", out.reason)
    assert.are.equal("running", state_in_hook, "the pause takes effect when the hook returns")
    assert.are.equal("paused", vm.state)
    local last = counter(vm)
    for round = 1, 2 do
      promptly("resume", vm.resume, vm)
      assert.are.equal("running", vm.state)
      assert.is_nil(promptly("wait", vm.wait, vm, 0.3), "it runs on with what was left of its timeout")
      promptly("pause", vm.pause, vm)
      local n = counter(vm)
      assert(n > last, ("round %d: the counter stayed at %d"):format(round, n))
      last = n
    end
    assert.are.equal("stopped", promptly("stop", vm.stop, vm).reason)
    assert.are.equal(1, select(2, vm.console.output:gsub("counting", "")), "the guest started once")
  end)

  it("closes from a hook once the run unwinds", function()
    local before = helper.resources()
    do
      local vm = counting_vm()
      local closed, state_in_hook = false, nil
      vm:on_io(SERIAL, { write = true }, function()
        if not closed then
          closed = true
          promptly("close from a hook", vm.close, vm)
          state_in_hook = vm.state
        end
      end)
      assert.are.equal("stopped", promptly("run", vm.run, vm, { timeout = 30 }).reason)
      assert.are.equal("closed", state_in_hook)
      assert.are.equal("closed", vm.state)
      assert.matches("^vmcore%.VmStateError: the VM is closed", helper.error_of(vm.run, vm))
      vm:close()
    end
    -- Closed, not collected: everything is freed already.
    assert.are.same(before, helper.resources(before))
  end)

  it("stops its VM from a hook that runs inside another VM's run", function()
    local outer <close> = counting_vm()
    local inner <close> = helper.flat_vm("hello-long.bin", nil, { memory = "32M" })
    local inner_out
    inner:on_io(SERIAL, { write = true }, function()
      if outer.state == "running" then
        promptly("stop from a nested hook", outer.stop, outer)
      end
    end)
    outer:on_io(SERIAL, { write = true }, function()
      if not inner_out then
        inner_out = promptly("run from a hook of another VM", inner.run, inner, { timeout = 5 })
      end
    end)
    assert.are.equal("stopped", promptly("run", outer.run, outer, { timeout = 30 }).reason)
    assert.are.equal("halted", inner_out.reason)
  end)

  it("frees 10 VMs whose hooks and stop results refer to them when they are collected", function()
    local before = helper.resources()
    for i = 1, 10 do
      local vm = vmcore.Vm({ memory = "32M" })
      vm:load_flat(helper.guest("hello-long.bin"))
      vm:on_io(SERIAL, { write = true }, function(ev)
        assert(ev.vm == vm)
        if i % 2 == 0 then
          ev:stop({ vm = vm })
        end
      end)
      local out = vm:run({ timeout = 5 })
      if i % 2 == 0 then
        assert(out.reason == "hook_stop" and out.result.vm == vm, tostring(out))
      else
        assert(out.reason == "halted", tostring(out))
      end
    end
    -- Two passes (the first may only run finalizers); the VMs' fds are closed on reaper threads,
    -- which helper.resources gives up to 2 s.
    collectgarbage("collect")
    collectgarbage("collect")
    assert.are.equal(before.fds, helper.resources(before).fds)
  end)

  it("lets go of its hooks and stop results when it is closed", function()
    local vm = helper.flat_vm("hello-long.bin", nil, { memory = "32M" })
    local weak = setmetatable({}, { __mode = "v" })
    do
      local result = {}
      local function hook(ev)
        ev:stop(result)
      end
      weak.hook, weak.result = hook, result
      vm:on_io(SERIAL, { write = true }, hook)
    end
    assert.are.equal(weak.result, vm:run({ timeout = 5 }).result)
    assert.matches("^vmcore%.VmStateError: the VM has ended", helper.error_of(vm.start, vm))
    collectgarbage("collect")
    assert.are.equal(weak.result, vm.outcome.result, "a refused start keeps the outcome's result")
    assert.is_function(weak.hook)
    vm:close()
    collectgarbage("collect")
    collectgarbage("collect")
    assert.is_nil(weak.hook)
    assert.is_nil(weak.result)
  end)
end)

describe("lifecycle stress", function()
  -- What a successful call may leave behind. Hooks served while a call waits may stop, pause
  -- or close the VM, so calls that serve hooks allow those states too.
  local ALLOWED_AFTER = {
    start = { running = true, paused = true, ended = true, closed = true },
    run = { paused = true, ended = true, closed = true },
    wait = { running = true, paused = true, ended = true, closed = true },
    pause = { paused = true, ended = true, closed = true },
    resume = { running = true, ended = true },
    stop = { created = true, loaded = true, ended = true, closed = true },
    close = { closed = true },
  }
  local REASONS = { timeout = true, halted = true, stopped = true, paused = true }

  it("survives 500 random operations on spinning, halting and counting guests", function()
    local seed = tonumber(os.getenv("VMCORE_STRESS_SEED")) or (os.time() ~ math.floor(now() * 1e6))
    print(("\nlifecycle stress: seed %d (VMCORE_STRESS_SEED=%d repeats it)"):format(seed, seed))
    math.randomseed(seed)
    local function fail(message)
      error(("seed %d: %s"):format(seed, message), 2)
    end

    local before = helper.resources()
    local started = now()
    local code = {}
    for _, name in ipairs({ "spin.bin", "hello-long.bin", "count.bin" }) do
      code[#code + 1] = helper.guest(name)
    end
    local slowest, slowest_call = 0, nil
    local counts, refusals = {}, {}

    -- Calls f(...) in pcall; every call must return within PROMPT seconds, and may only fail
    -- with a legal refusal (a VmStateError). Returns pcall's results.
    local function timed(what, f, ...)
      local t0 = now()
      local results = table.pack(pcall(f, ...))
      local took = now() - t0
      if took > slowest then
        slowest, slowest_call = took, what
      end
      if took >= PROMPT then
        fail(("%s took %.2f s"):format(what, took))
      end
      if not results[1] then
        local err = results[2]
        if type(err) ~= "string" or not err:match("^vmcore%.VmStateError: ") then
          fail(("%s raised %s"):format(what, tostring(err)))
        end
        local why = err:gsub("^vmcore%.VmStateError: ", ""):gsub(";.*", ""):gsub(" %(.*", "")
        refusals[why] = (refusals[why] or 0) + 1
      end
      return table.unpack(results, 1, results.n)
    end

    local PLANS = { "stop", "pause", "close" }
    -- A VM with a random guest; most have a hook on serial output that carries out its plan
    -- (stop, pause or close the VM from inside the hook) once, when one is set. The hook refers
    -- to the VM, as hooks usually do.
    local function new_vm()
      local vm = vmcore.Vm({ memory = "32M" })
      local entry = { vm = vm }
      vm:load_flat(code[math.random(#code)])
      if math.random(4) > 1 then
        entry.plan = math.random(2) == 1 and PLANS[math.random(#PLANS)] or nil
        vm:on_io(SERIAL, { write = true }, function(ev)
          local plan = entry.plan
          if plan then
            entry.plan = nil
            counts[plan .. " in a hook"] = (counts[plan .. " in a hook"] or 0) + 1
            local ok, err = timed(plan .. " from a hook", ev.vm[plan], ev.vm)
            assert(ok, err)
          end
        end)
      end
      return entry
    end

    local function short_timeout()
      return { timeout = math.random(1, 20) / 1000 }
    end

    local function check_state(op, vm)
      local state = vm.state
      if ALLOWED_AFTER[op] and not ALLOWED_AFTER[op][state] then
        fail(("%s succeeded and left the VM %s"):format(op, state))
      end
    end

    local function check_outcome(op, out)
      if out ~= nil and not REASONS[out.reason] then
        fail(("%s ended with %s"):format(op, tostring(out)))
      end
    end

    local ops = {
      start = function(e)
        return timed("start", e.vm.start, e.vm, math.random(4) > 1 and short_timeout() or nil)
      end,
      run = function(e)
        local ok, out = timed("run", e.vm.run, e.vm, short_timeout())
        check_outcome("run", ok and out or nil)
        return ok
      end,
      wait = function(e)
        local ok, out = timed("wait", e.vm.wait, e.vm, math.random(0, 10) / 1000)
        check_outcome("wait", ok and out or nil)
        return ok
      end,
      pause = function(e)
        return timed("pause", e.vm.pause, e.vm)
      end,
      resume = function(e)
        return timed("resume", e.vm.resume, e.vm)
      end,
      stop = function(e)
        local ok, out = timed("stop", e.vm.stop, e.vm)
        check_outcome("stop", ok and out or nil)
        return ok
      end,
      close = function(e)
        return timed("close", e.vm.close, e.vm)
      end,
      load = function(e)
        return timed("load", e.vm.load_flat, e.vm, code[math.random(#code)])
      end,
      arm = function(e)
        e.plan = PLANS[math.random(#PLANS)]
        return false
      end,
    }
    -- Relative frequencies; "new" and "drop" act on the slot rather than its VM.
    local weights = {
      new = 6, drop = 4, start = 16, run = 18, wait = 6, pause = 12, resume = 10,
      stop = 8, close = 4, load = 5, arm = 8,
    }
    local names, total = {}, 0
    for name in pairs(weights) do
      names[#names + 1] = name
    end
    table.sort(names) -- pairs' order is not repeatable; the seed must be
    for _, name in ipairs(names) do
      total = total + weights[name]
    end
    local function pick()
      local r = math.random(total)
      for _, name in ipairs(names) do
        r = r - weights[name]
        if r <= 0 then
          return name
        end
      end
    end

    local slots = {}
    for _ = 1, 500 do
      local slot = math.random(3)
      local e = slots[slot]
      -- A closed VM only refuses: mostly replace it, now and then try it.
      local op = pick()
      if not e or (e.vm.state == "closed" and math.random(4) > 1) then
        op = "new"
      end
      counts[op] = (counts[op] or 0) + 1
      if op == "new" then
        slots[slot] = select(2, timed("new", new_vm))
      elseif op == "drop" then
        -- Dropped without close: the garbage collector frees it, running or not.
        slots[slot], e = nil, nil
        if math.random(2) == 1 then
          timed("collectgarbage", collectgarbage, "collect")
        end
      elseif ops[op](e) then
        check_state(op, e.vm)
      end
    end
    slots = nil
    timed("collectgarbage", collectgarbage, "collect")
    timed("collectgarbage", collectgarbage, "collect")
    -- The VMs' fds are closed on reaper threads: helper.resources waits up to 2 s for them.
    local after_fds = helper.resources(before).fds

    local summary = {}
    for name, n in pairs(counts) do
      summary[#summary + 1] = ("%s=%d"):format(name, n)
    end
    table.sort(summary)
    print(("lifecycle stress: 500 operations in %.2f s (%s); slowest call %s, %.3f s"):format(
      now() - started, table.concat(summary, " "), slowest_call, slowest))
    local why = {}
    for message, n in pairs(refusals) do
      why[#why + 1] = ("%dx %s"):format(n, message)
    end
    table.sort(why)
    print("lifecycle stress: refusals: " .. table.concat(why, "; "))
    assert(after_fds == before.fds, ("seed %d: %d fds before, %d after"):format(seed, before.fds, after_fds))
  end)
end)
