//! Hooks from Lua, and the pump that runs them.
//!
//! A core hook is called on a vCPU thread, but a Lua state may only be used by the thread that
//! owns it, and that thread is blocked in `vm:run()` (or `wait`, `start`, `stop`,
//! `console:expect`) while the guest runs. So the core callback calls no Lua: it copies the event
//! into a [`Request`], sends it over the VM's channel to the Lua thread with a one-shot reply
//! [`Slot`], and waits until the answer (value, CPUID registers, veto, stop, or an error message)
//! comes back, which it applies to the core event.
//!
//! The Lua thread, for its part, does not block inside a core call while hooks may fire: it makes
//! the call on a helper thread and meanwhile receives on the VM's channel, serving hook requests
//! (calling the dispatcher `vmcore.lua` passed in, which calls the hook with an event table) until
//! the helper's [`Msg::Done`] arrives. A VM that never had a Lua hook keeps the direct path.
//!
//! While the Lua thread serves a VM's hooks it carries the core's [`ServingHooks`] mark for that
//! VM, so a hook may stop, pause or close its own VM: the core records the request and the run
//! unwinds when the hook returns. Calls that would wait for the run (`wait`, `run`, `start`,
//! `console:expect`) are refused from there instead: the run waits for the hook.
//!
//! Closing the VM shuts the door (the shared sender) and drops every request still queued, so a
//! vCPU waiting for an answer wakes with "the Lua state is gone" and the VM can end.
//!
//! Both waits (the Lua thread for the next request, a vCPU for its answer) poll for a few tens of
//! microseconds before they block: see [`SPIN`].

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::Thread;
use std::time::{Duration, Instant};

use mlua::{Function, Lua, Table, Value};
use vmcore::devices::virtio::net::NetPort;
use vmcore::hooks::{Event, EventKind, HookError, HookFn, HookId, StopRequest, Trigger};
use vmcore::vm::ServingHooks;
use vmcore::{Error, ExitReason, Outcome, Vm};

use crate::args::{self, describe, int};
use crate::fail::{bad, core, Fail, Res};

/// What a waiting vCPU is told when nobody will ever answer its hook.
const GONE: &str = "the Lua state is gone (the VM was closed or collected while a hook waited for Lua)";

/// How long a waiting side polls for its message before it blocks. Handing a hook to the Lua
/// thread and back takes two thread wake-ups, and a wake-up on another CPU can cost more than the
/// exit the hook is about (an IPI to an idle CPU; under nested virtualization, measured at about
/// 16 us each, against 8.5 us for a whole port exit). A hook's answer, and during a busy run the
/// next hook, usually come within microseconds, so a short poll saves both wake-ups; past it the
/// wait blocks as usual, so an idle VM costs no CPU. Measured on a port exit: 1.3x a bare KVM
/// loop with the poll, 2x to 8x without.
const SPIN: Duration = Duration::from_micros(50);

/// [`SPIN`] with more than one CPU; none with one (polling would only delay the thread it waits
/// for).
fn spin_budget() -> Duration {
    static BUDGET: OnceLock<Duration> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cpus > 1 {
            SPIN
        } else {
            Duration::ZERO
        }
    })
}

/// Polls `ready` for up to [`SPIN`] (yielding between polls, in case the thread it waits for
/// shares this CPU); returns whether it became true. The caller blocks after a `false`.
fn spin_until(mut ready: impl FnMut() -> bool) -> bool {
    let budget = spin_budget();
    if budget.is_zero() {
        return ready();
    }
    let started = Instant::now();
    loop {
        for _ in 0..16 {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        if started.elapsed() >= budget {
            return ready();
        }
        std::thread::yield_now();
    }
}

/// Receives like `recv`, checking without blocking for up to [`SPIN`] first.
fn receive<T>(rx: &Receiver<T>) -> Result<T, RecvError> {
    let mut early = None;
    let got = spin_until(|| {
        if early.is_some() {
            return true;
        }
        match rx.try_recv() {
            Ok(v) => {
                early = Some(Ok(v));
                true
            }
            Err(TryRecvError::Disconnected) => {
                early = Some(Err(RecvError));
                true
            }
            Err(TryRecvError::Empty) => false,
        }
    });
    match early {
        Some(result) if got => result,
        _ => rx.recv(),
    }
}

/// Where the Lua thread leaves one hook's answer for the vCPU thread waiting for it. Lighter
/// than a channel (measured): one small allocation, and no syscall unless the waiter sleeps.
struct Slot {
    reply: Mutex<Option<Reply>>,
    filled: AtomicBool,
    waiter: Thread,
}

impl Slot {
    fn new() -> Arc<Slot> {
        Arc::new(Slot { reply: Mutex::new(None), filled: AtomicBool::new(false), waiter: std::thread::current() })
    }

    fn fill(&self, reply: Reply) {
        *self.reply.lock().unwrap_or_else(PoisonError::into_inner) = Some(reply);
        self.filled.store(true, Ordering::Release);
        self.waiter.unpark();
    }

    /// Waits for the reply (on the thread that made the slot).
    fn wait(&self) -> Reply {
        if !spin_until(|| self.filled.load(Ordering::Acquire)) {
            while !self.filled.load(Ordering::Acquire) {
                std::thread::park();
            }
        }
        self.reply.lock().unwrap_or_else(PoisonError::into_inner).take().unwrap_or(Reply::Gone)
    }
}

/// The Lua thread's end of a [`Slot`]: answering fills it; dropping it unanswered (the VM was
/// closed with the request still queued) fills it with "the Lua state is gone".
struct Responder(Option<Arc<Slot>>);

impl Responder {
    fn send(mut self, reply: Reply) {
        if let Some(slot) = self.0.take() {
            slot.fill(reply);
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            slot.fill(Reply::Gone);
        }
    }
}

/// A message to the Lua thread of one VM.
enum Msg {
    /// A hook fired; answer on `reply`.
    Hook(Request),
    /// A network device's guest sent a frame and its Lua filter decides.
    Packet(PacketRequest),
    /// The core call made on the helper thread has returned: stop pumping.
    Done,
}

/// One hook call, as owned data the Lua thread can turn into an event table.
struct Request {
    /// Which Lua hook (the id `vm:on_*` returned).
    token: u64,
    vcpu: usize,
    rip: u64,
    kind: EventKind,
    value: Option<u64>,
    instruction: String,
    reply: Responder,
}

/// One frame for a Lua `on_packet` filter, from a device's worker thread.
struct PacketRequest {
    token: u64,
    frame: Vec<u8>,
    reply: Responder,
}

/// What a vCPU gets back for a [`Request`].
enum Reply {
    /// The hook's decisions.
    Answer(Answer),
    /// The message of the error the hook raised (or of what went wrong calling it).
    Failed(String),
    /// Nobody will answer: the VM was closed with the request still queued.
    Gone,
}

struct Answer {
    value: Option<u64>,
    cpuid: Option<[u32; 4]>,
    veto: bool,
    stop: Option<Stop>,
}

struct Stop {
    code: Option<u64>,
    detail: String,
    /// Where `vmcore.lua` keeps the value passed to `ev:stop` (see [`StopToken`]).
    token: StopToken,
}

/// The payload of a `hook_stop` outcome: the key under which `vmcore.lua` keeps the value the
/// hook passed to `ev:stop`, in a table of the VM's own Lua object. The core keeps outcomes, and
/// a registry reference held there would be a root for the garbage collector: a result that
/// refers to its VM (`ev:stop(ev.vm)`, or any table or closure that reaches it) would keep the
/// VM, and its file descriptors and memory, alive for good. A key in a table only the VM's
/// object reaches makes a cycle the collector can see and free.
struct StopToken(i64);

/// The payload of a `hook_error` outcome whose error `run`/`wait` have not raised yet. The first
/// of them to see the outcome takes it and raises; later looks return the outcome, as in Python.
struct Unraised;

/// The sending side of a VM's channel, shared by its hook callbacks. `None` once the VM is closed,
/// so no request can be queued after the queue was emptied.
type Door = Arc<Mutex<Option<Sender<Msg>>>>;

fn open(door: &Door) -> MutexGuard<'_, Option<Sender<Msg>>> {
    door.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sends [`Msg::Done`] when dropped, so the pump ends even if the core call unwinds.
struct DoneOnDrop(Sender<Msg>);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(Msg::Done);
    }
}

/// Sets a flag for as long as it lives.
struct Raised<'a>(&'a Cell<bool>);

impl<'a> Raised<'a> {
    fn new(flag: &'a Cell<bool>) -> Raised<'a> {
        flag.set(true);
        Raised(flag)
    }
}

impl Drop for Raised<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// The hook state of one native VM. It lives on the Lua thread (it is not `Send`); only the
/// [`Door`] and the reply [`Slot`]s cross to vCPU threads.
pub(crate) struct Pump {
    door: Door,
    /// For helper threads' `Done`, which must arrive even after the door is shut.
    done: Sender<Msg>,
    rx: Receiver<Msg>,
    /// Lua hook ids to core hook ids.
    ids: RefCell<HashMap<u64, HookId>>,
    next_token: Cell<u64>,
    /// Whether a Lua hook was ever added: until then blocking calls take the direct path. (Not
    /// "is one registered now": a vCPU may still wait for a hook removed since it fired.)
    hooked: Cell<bool>,
    /// Whether the Lua thread is serving this VM's hooks now (so Lua code running now runs in
    /// one of them, or in something it called).
    pumping: Cell<bool>,
    /// Whether the door was shut while pumping (a hook closed the VM): the pump then drops what
    /// is still queued instead of serving it.
    shut: Cell<bool>,
    /// Whether a static CPUID hook is being served: the core holds the VM's run state then.
    static_cpuid: Cell<bool>,
    /// Exit reasons as Lua strings, made once: in a module, every `&str` passed to Lua is a
    /// protected call and a registry reference, which a hook on every exit would pay each time.
    reasons: RefCell<HashMap<&'static str, mlua::LuaString>>,
}

impl Pump {
    pub(crate) fn new() -> Pump {
        let (tx, rx) = mpsc::channel();
        Pump {
            door: Arc::new(Mutex::new(Some(tx.clone()))),
            done: tx,
            rx,
            ids: RefCell::new(HashMap::new()),
            next_token: Cell::new(1),
            hooked: Cell::new(false),
            pumping: Cell::new(false),
            shut: Cell::new(false),
            static_cpuid: Cell::new(false),
            reasons: RefCell::new(HashMap::new()),
        }
    }

    /// Registers a Lua hook (see `vm:on_*` in `vmcore.lua`); returns its id. The dispatcher finds
    /// the Lua function by that id.
    pub(crate) fn add(&self, vm: &Vm, kind: &Value, params: &Value, opts: &Value) -> Res<i64> {
        self.refuse_in_static_cpuid("add a hook")?;
        let kind = args::text(kind, "hook kind")?;
        let Value::Table(params) = params else {
            return Err(bad(format!("hook parameters must be a table, got {}", describe(params))));
        };
        let trigger = trigger(&kind, params, opts)?;
        let token = self.next_token.get();
        let id = core(vm.add_hook(trigger, callback(token, self.door.clone())))?;
        self.next_token.set(token + 1);
        self.ids.borrow_mut().insert(token, id);
        self.hooked.set(true);
        Ok(int(token))
    }

    /// Removes a Lua hook by id; returns whether it was registered.
    pub(crate) fn remove(&self, vm: &Vm, id: &Value) -> Res<bool> {
        let token = match *id {
            Value::Integer(i) => i.cast_unsigned(),
            _ => return Ok(false),
        };
        let Some(id) = self.ids.borrow_mut().remove(&token) else {
            return Ok(false);
        };
        core(vm.remove_hook(id))
    }

    /// Refuses calls that need the VM's run state while a static CPUID hook runs (the core holds
    /// that state while it asks such hooks, so waiting for it would never end).
    pub(crate) fn refuse_in_static_cpuid(&self, what: &str) -> Res<()> {
        if self.static_cpuid.get() {
            return Err(Error::State(format!(
                "cannot {what} from a static CPUID hook: it runs while the VM is being set up, before the first run"
            ))
            .into());
        }
        Ok(())
    }

    /// The core's mark that this thread runs one of `vm`'s hooks, if Lua code running now runs
    /// inside one of them (or a packet filter): then a stop, pause or close of `vm` only records
    /// the request. The pump already holds the mark while it serves; it is entered again here for
    /// a hook that runs inside another VM's wait (a hook of this VM called `other:run()`, whose
    /// hook called this VM's `stop`), where the thread carries the other VM's mark.
    pub(crate) fn serving(&self, vm: &Vm) -> Option<ServingHooks> {
        self.pumping.get().then(|| vm.serving_hooks())
    }

    /// Makes a core call that may wait for hooks: directly if this VM never had a Lua hook,
    /// otherwise on a helper thread while this thread serves hook requests with `dispatch`. From
    /// inside one of this VM's hooks, `from_hook` says whether the call is made at once or
    /// refused.
    pub(crate) fn pumped<T: Send>(
        &self,
        lua: &Lua,
        dispatch: &Value,
        vm: &Vm,
        what: &str,
        from_hook: FromHook,
        call: impl FnOnce(&Vm) -> T + Send,
    ) -> Res<T> {
        if !self.hooked.get() {
            return Ok(call(vm));
        }
        if let Some(_serving) = self.serving(vm) {
            // The vCPU that called the hook waits for it to return: a call that waited for the
            // run would wait for itself.
            return match from_hook {
                FromHook::Record => Ok(call(vm)),
                FromHook::Refuse => Err(Error::State(format!(
                    "cannot {what} from inside one of its hooks: the run waits for the hook to return \
                     (vm:stop(), vm:pause() and vm:close() take effect when it does)"
                ))
                .into()),
            };
        }
        let _pumping = Raised::new(&self.pumping);
        // Every hook served below runs on this thread, which the core must know, so that a stop,
        // pause or close from the hook does not wait for the run that waits for the hook. Lua
        // runs nothing else on this thread until the call returns, so the mark covers the loop.
        let _serving = vm.serving_hooks();
        std::thread::scope(|scope| {
            // The guard is made on the helper itself: if the thread cannot start, no Done is
            // queued for a later pump to mistake for its own.
            let done = self.done.clone();
            let helper = std::thread::Builder::new()
                .name("vmcore-lua-wait".into())
                .spawn_scoped(scope, move || {
                    let _done = DoneOnDrop(done);
                    call(vm)
                })
                .map_err(|e| Fail::from(Error::State(format!("cannot start a thread to {what}: {e}"))))?;
            // The helper's Done ends the loop; `self.done` keeps the channel open until then.
            loop {
                match receive(&self.rx) {
                    Ok(Msg::Done) | Err(_) => break,
                    // A hook closed the VM: what is still queued is dropped unserved, which tells
                    // its vCPU or device that the Lua state is gone.
                    Ok(_) if self.shut.get() => {}
                    Ok(Msg::Hook(request)) => self.serve(lua, dispatch, request),
                    Ok(Msg::Packet(request)) => self.serve_packet(lua, dispatch, request),
                }
            }
            helper.join().map_err(|_| Fail::from(Error::State(format!("the thread that went to {what} failed"))))
        })
    }

    /// Answers one hook request. Whatever happens, the vCPU gets a reply.
    fn serve(&self, lua: &Lua, dispatch: &Value, request: Request) {
        let reply = match dispatch {
            Value::Function(f) => {
                let _static =
                    matches!(request.kind, EventKind::CpuidTable { .. }).then(|| Raised::new(&self.static_cpuid));
                self.ask(lua, f, &request)
            }
            _ => Reply::Failed("vmcore: no hook dispatcher was passed to this call".to_string()),
        };
        request.reply.send(reply);
    }

    /// A network filter that asks the Lua function registered under the returned id (the
    /// dispatcher's `hooks[id]`). The device's worker thread waits for the answer, which comes
    /// while this VM's Lua thread is in a blocking call (`run`, `wait`, `expect`...); meanwhile the
    /// vCPUs run on. A closed VM answers "drop".
    pub(crate) fn packet_filter(&self, port: &NetPort) -> i64 {
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        self.hooked.set(true);
        let door = self.door.clone();
        port.set_filter(Some(Arc::new(move |frame: &[u8]| {
            let slot = Slot::new();
            let request = PacketRequest { token, frame: frame.to_vec(), reply: Responder(Some(slot.clone())) };
            let sent = match open(&door).as_ref() {
                Some(tx) => tx.send(Msg::Packet(request)).is_ok(),
                None => false,
            };
            if !sent {
                return false;
            }
            match slot.wait() {
                Reply::Answer(answer) => answer.value != Some(0),
                Reply::Failed(message) => {
                    eprintln!("vmcore: on_packet failed; the frame is dropped: {message}");
                    false
                }
                Reply::Gone => false,
            }
        })));
        int(token)
    }

    /// Asks a Lua filter about one frame: the dispatcher answers `true, 1` (pass) or `true, 0`.
    fn serve_packet(&self, lua: &Lua, dispatch: &Value, request: PacketRequest) {
        let reply = match dispatch {
            Value::Function(f) => {
                let called = lua.create_string(&request.frame).and_then(|frame| {
                    f.call::<Answered>((int(request.token), PACKET_CODE, 0i64, 0i64, Value::Nil, Value::Nil, frame))
                });
                match called.map_err(|e| e.to_string()).and_then(answer) {
                    Ok(answer) => Reply::Answer(answer),
                    Err(message) => Reply::Failed(message),
                }
            }
            _ => Reply::Failed("vmcore: no hook dispatcher was passed to this call".to_string()),
        };
        request.reply.send(reply);
    }

    /// Shuts the door and drops every queued request, waking the vCPUs that wait on them with
    /// an error. After this no hook can wait for Lua. From inside a hook the queue is left to
    /// the pump, which drops requests from now on: draining here could swallow the `Done` of
    /// the call the pump serves, and the pump would then wait for ever.
    pub(crate) fn close(&self) {
        open(&self.door).take();
        if self.pumping.get() {
            self.shut.set(true);
            return;
        }
        while let Ok(msg) = self.rx.try_recv() {
            drop(msg);
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.close();
    }
}

/// What a pumped call does when Lua code inside one of its VM's hooks makes it.
pub(crate) enum FromHook {
    /// It would wait for the run, which waits for the hook: refused with an error.
    Refuse,
    /// The core only records the request (stop, pause) and returns: made at once.
    Record,
}

/// The core callback of a Lua hook: sends the event to the Lua thread and applies its answer.
fn callback(token: u64, door: Door) -> HookFn {
    Arc::new(move |ev: &mut Event| {
        let slot = Slot::new();
        let reply = Responder(Some(slot.clone()));
        let request = Request {
            token,
            vcpu: ev.vcpu,
            rip: ev.rip,
            kind: ev.kind.clone(),
            value: ev.value,
            instruction: ev.instruction.clone(),
            reply,
        };
        let sent = match open(&door).as_ref() {
            Some(tx) => tx.send(Msg::Hook(request)).is_ok(),
            None => false,
        };
        if !sent {
            return Err(HookError::new(GONE));
        }
        match slot.wait() {
            Reply::Answer(answer) => {
                ev.value = answer.value;
                if answer.cpuid.is_some() {
                    ev.cpuid = answer.cpuid;
                }
                if answer.veto {
                    ev.veto();
                }
                if let Some(stop) = answer.stop {
                    let payload: Box<dyn Any + Send> = Box::new(stop.token);
                    ev.stop(StopRequest { code: stop.code, detail: stop.detail, payload: Some(payload) });
                }
                Ok(())
            }
            Reply::Failed(message) => Err(HookError { message, payload: Some(Box::new(Unraised)) }),
            Reply::Gone => Err(HookError::new(GONE)),
        }
    })
}

impl Pump {
    /// Calls the dispatcher with the event and reads its answer.
    fn ask(&self, lua: &Lua, dispatch: &Function, r: &Request) -> Reply {
        let called = self.call_dispatcher(lua, dispatch, r).map_err(|e| e.to_string());
        match called.and_then(answer) {
            Ok(answer) => Reply::Answer(answer),
            Err(message) => Reply::Failed(message),
        }
    }

    fn call_dispatcher(&self, lua: &Lua, dispatch: &Function, r: &Request) -> mlua::Result<Answered> {
        let (a, b, c) = self.operands(lua, &r.kind)?;
        let instruction = match r.instruction.as_str() {
            "" => Value::Nil,
            text => Value::String(lua.create_string(text)?),
        };
        dispatch.call((
            int(r.token),
            kind_code(&r.kind),
            r.vcpu as i64,
            int(r.rip),
            r.value.map(int),
            instruction,
            a,
            b,
            c,
        ))
    }

    /// The kind's own fields, in the order the dispatcher takes them (see `dispatcher` in
    /// `vmcore.lua`): io and mmio `port`/`address, size, is_write`; msr `index, is_write`; cpuid
    /// `leaf, subleaf`; cr `cr, old, is_write`; breakpoint `address`; exit `reason`. The
    /// dispatcher builds the event table from them: one Lua table constructor costs less than
    /// setting each field from Rust.
    fn operands(&self, lua: &Lua, kind: &EventKind) -> mlua::Result<(Value, Value, Value)> {
        let n = |v: i64| Value::Integer(v);
        Ok(match *kind {
            EventKind::Io { port, size, write } => (n(port.into()), n(size.into()), Value::Boolean(write)),
            EventKind::Mmio { address, size, write } => (n(int(address)), n(size.into()), Value::Boolean(write)),
            EventKind::Msr { index, write } => (n(index.into()), Value::Boolean(write), Value::Nil),
            EventKind::Cpuid { leaf, subleaf } | EventKind::CpuidTable { leaf, subleaf } => {
                (n(leaf.into()), n(subleaf.into()), Value::Nil)
            }
            EventKind::Cr { cr, write, old } => (n(cr.into()), n(int(old)), Value::Boolean(write)),
            EventKind::Breakpoint { address } => (n(int(address)), Value::Nil, Value::Nil),
            EventKind::Exit { reason } => {
                let mut reasons = self.reasons.borrow_mut();
                let name = match reasons.get(reason) {
                    Some(name) => name.clone(),
                    None => reasons.entry(reason).or_insert(lua.create_string(reason)?).clone(),
                };
                (Value::String(name), Value::Nil, Value::Nil)
            }
            EventKind::Step | EventKind::Hlt | EventKind::Shutdown => (Value::Nil, Value::Nil, Value::Nil),
        })
    }
}

/// The code the dispatcher knows a frame for an `on_packet` filter by (past `KINDS`).
const PACKET_CODE: i64 = 11;

/// The event kind as the dispatcher's `KINDS` table numbers it (a number costs Lua nothing to
/// receive; a string from a module costs a protected call).
fn kind_code(kind: &EventKind) -> i64 {
    match kind {
        EventKind::Io { .. } => 1,
        EventKind::Mmio { .. } => 2,
        EventKind::Msr { .. } => 3,
        EventKind::Cpuid { .. } | EventKind::CpuidTable { .. } => 4,
        EventKind::Cr { .. } => 5,
        EventKind::Breakpoint { .. } => 6,
        EventKind::Step => 7,
        EventKind::Hlt => 8,
        EventKind::Shutdown => 9,
        EventKind::Exit { .. } => 10,
    }
}

/// What the dispatcher returns: `true, value` when the hook decided nothing else, or
/// `true, value, vetoed, stopped, result, detail, eax, ebx, ecx, edx` (it has checked their
/// types; `stopped` is `false` or the [`StopToken`] it keeps `result` under), or
/// `false, message`.
type Answered = (Value, Value, Value, Value, Value, Value, Value, Value, Value, Value);

fn answer(out: Answered) -> Result<Answer, String> {
    let (ok, value, vetoed, stopped, result, detail, eax, ebx, ecx, edx) = out;
    if !matches!(ok, Value::Boolean(true)) {
        return Err(match value {
            Value::String(s) => s.to_string_lossy(),
            other => format!("a hook failed with a {} error", other.type_name()),
        });
    }
    let value = match value {
        Value::Nil => None,
        v => Some(whole(&v).ok_or_else(|| format!("a hook's value must be an integer, not {}", describe(&v)))?),
    };
    let cpuid = match eax {
        Value::Nil => None,
        eax => {
            let mut regs = [0u32; 4];
            for (reg, v) in regs.iter_mut().zip([eax, ebx, ecx, edx]) {
                let bits =
                    whole(&v).ok_or_else(|| format!("CPUID registers must be integers, not {}", describe(&v)))?;
                *reg = bits as u32; // the low 32 bits, as the register holds them
            }
            Some(regs)
        }
    };
    let stop = match stopped {
        Value::Integer(token) => {
            let detail = match detail {
                Value::String(s) => s.to_string_lossy(),
                _ => "stopped by a hook".to_string(),
            };
            Some(Stop { code: whole(&result), detail, token: StopToken(token) })
        }
        _ => None,
    };
    Ok(Answer { value, cpuid, veto: matches!(vetoed, Value::Boolean(true)), stop })
}

/// A Lua integer (or integral float) as u64 bits; `None` for anything else.
fn whole(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(_) | Value::Number(_) => args::bits(v, "").ok(),
        _ => None,
    }
}

/// Raises (once) the error of a hook that ended the run with `hook_error`.
pub(crate) fn raise_hook_error(o: &Outcome) -> Res<()> {
    if o.reason != ExitReason::HookError {
        return Ok(());
    }
    if let Some(payload) = &o.payload {
        if payload.peek(|p| p.is_some_and(|p| p.is::<Unraised>())) && payload.take().is_some() {
            return Err(Fail::Core(format!("vmcore.HookError: {}", o.detail)));
        }
    }
    Ok(())
}

/// The key `vmcore.lua` keeps the value a hook passed to `ev:stop` under, if the outcome is
/// such a stop (see [`StopToken`]).
pub(crate) fn stop_token(o: &Outcome) -> Option<i64> {
    let payload = o.payload.as_ref()?;
    payload.peek(|p| p.and_then(|p| p.downcast_ref::<StopToken>()).map(|t| t.0))
}

/// Reads a non-negative integer no larger than `max`.
fn ranged(v: &Value, what: &str, max: u64) -> Res<u64> {
    let n = args::count(v, what)? as u64;
    if n > max {
        return Err(bad(format!("{what} must be at most {max:#x}, got {n:#x}")));
    }
    Ok(n)
}

/// The core trigger for a hook kind, from the positional parameters `vmcore.lua` put in `params`
/// and the user's options table.
fn trigger(kind: &str, params: &Table, opts: &Value) -> Res<Trigger> {
    let known: &[&str] = match kind {
        "io" => &["size", "write"],
        "mmio" | "msr" | "cr" => &["write"],
        "cpuid" => &["subleaf", "precise"],
        _ => &[],
    };
    let opts = args::options(opts, &format!("{kind} hook options"), known)?;
    let param = |name: &str| -> Res<Value> { Ok(params.raw_get::<Value>(name)?) };
    let opt = |name: &str| -> Res<Value> {
        Ok(match &opts {
            Some(t) => t.raw_get::<Value>(name)?,
            None => Value::Nil,
        })
    };
    // write = true: writes only; false: reads only; "both"; nil: the kind's default.
    let directions = |default: (bool, bool)| -> Res<(bool, bool)> {
        match opt("write")? {
            Value::Nil => Ok(default),
            Value::Boolean(true) => Ok((false, true)),
            Value::Boolean(false) => Ok((true, false)),
            Value::String(s) if s.as_bytes().as_ref() == b"both" => Ok((true, true)),
            other => Err(bad(format!("write must be true, false or \"both\", got {}", describe(&other)))),
        }
    };
    Ok(match kind {
        "io" => {
            let port = ranged(&param("port")?, "port", 0xFFFF)?;
            let size = match opt("size")? {
                Value::Nil => 1,
                v => ranged(&v, "size", 0x1_0000)?,
            };
            if size == 0 || port + size > 0x1_0000 {
                return Err(bad(format!("ports {port:#x}+{size} are not a range of I/O ports")));
            }
            let (reads, writes) = directions((true, true))?;
            Trigger::Io { first: port as u16, last: (port + size - 1) as u16, reads, writes }
        }
        "mmio" => {
            let address = args::bits(&param("address")?, "address")?;
            let size = args::count(&param("size")?, "size")? as u64;
            let (reads, writes) = directions((true, true))?;
            Trigger::Mmio { address, size, reads, writes }
        }
        "msr" => {
            let index = ranged(&param("index")?, "MSR index", u64::from(u32::MAX))? as u32;
            let (reads, writes) = directions((true, false))?;
            Trigger::Msr { index, reads, writes }
        }
        "cpuid" => {
            let leaf = ranged(&param("leaf")?, "leaf", u64::from(u32::MAX))? as u32;
            let subleaf = match opt("subleaf")? {
                Value::Nil => None,
                v => Some(ranged(&v, "subleaf", u64::from(u32::MAX))? as u32),
            };
            let precise = match opt("precise")? {
                Value::Nil => false,
                Value::Boolean(b) => b,
                other => return Err(bad(format!("precise must be a boolean, got {}", describe(&other)))),
            };
            Trigger::Cpuid { leaf, subleaf, precise }
        }
        "cr" => {
            let cr = ranged(&param("cr")?, "control register", u64::from(u8::MAX))? as u8;
            let (reads, writes) = directions((false, true))?;
            Trigger::Cr { cr, reads, writes }
        }
        "breakpoint" => Trigger::Breakpoint { address: args::bits(&param("address")?, "address")? },
        "step" => Trigger::Step,
        "hlt" => Trigger::Hlt,
        "exit" => Trigger::AnyExit,
        "shutdown" => Trigger::Shutdown,
        other => return Err(bad(format!("unknown hook kind {other:?}"))),
    })
}
