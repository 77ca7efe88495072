//! The core's `log` records, for Lua. A Lua state belongs to one thread and vCPU threads log
//! from theirs, so records wait in a bounded queue until Lua asks for them (`vmcore.logs()`);
//! with `VMCORE_LOG=<level>` in the environment they are also printed to stderr as they come.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

use log::{Level, LevelFilter, Log, Metadata, Record};
use mlua::{Lua, Table};

use crate::fail::{bad, Res};

/// Records kept before the oldest are dropped (and counted).
const CAPACITY: usize = 10_000;

struct Queue {
    records: VecDeque<(Level, String, String)>,
    dropped: u64,
}

static QUEUE: Mutex<Queue> = Mutex::new(Queue { records: VecDeque::new(), dropped: 0 });
static TO_STDERR: AtomicBool = AtomicBool::new(false);

struct LuaLogger;

impl Log for LuaLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target().starts_with("vmcore")
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        if TO_STDERR.load(Ordering::Relaxed) {
            eprintln!("[{} {}] {message}", record.level(), record.target());
        }
        let mut queue = QUEUE.lock().unwrap_or_else(|p| p.into_inner());
        if queue.records.len() == CAPACITY {
            queue.records.pop_front();
            queue.dropped += 1;
        }
        queue.records.push_back((record.level(), record.target().to_string(), message));
    }

    fn flush(&self) {}
}

static LOGGER: LuaLogger = LuaLogger;

fn parse_level(name: &str) -> Option<LevelFilter> {
    name.parse().ok()
}

/// Installs the logger once per process (unless another one, e.g. Python's, is there already)
/// at `VMCORE_LOG`'s level, or `warn`.
pub(crate) fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let from_env = std::env::var("VMCORE_LOG").ok().and_then(|v| parse_level(&v));
        TO_STDERR.store(from_env.is_some(), Ordering::Relaxed);
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(from_env.unwrap_or(LevelFilter::Warn));
        }
    });
}

/// `set_log_level("debug")`: the most detailed level recorded ("off", "error", "warn", "info",
/// "debug", "trace").
pub(crate) fn set_level(name: &str) -> Res<()> {
    let level = parse_level(name)
        .ok_or_else(|| bad(format!("unknown log level {name:?}: expected off, error, warn, info, debug or trace")))?;
    log::set_max_level(level);
    Ok(())
}

/// Takes the queued records: a list of `{level=, target=, message=}`, oldest first, and how
/// many were dropped because nobody took them in time.
pub(crate) fn take(lua: &Lua) -> mlua::Result<(Table, u64)> {
    let (records, dropped) = {
        let mut queue = QUEUE.lock().unwrap_or_else(|p| p.into_inner());
        (std::mem::take(&mut queue.records), std::mem::take(&mut queue.dropped))
    };
    let list = lua.create_table()?;
    for (level, target, message) in records {
        let t = lua.create_table()?;
        t.set("level", level.as_str().to_ascii_lowercase())?;
        t.set("target", target)?;
        t.set("message", message)?;
        list.push(t)?;
    }
    Ok((list, dropped))
}
