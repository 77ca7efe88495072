//! Lua values to core arguments, and core results to Lua values.
//!
//! Native methods take every argument as a raw [`Value`] and convert it here, so a wrong type is
//! reported as a `vmcore.ConfigError` naming the argument rather than as an mlua conversion error.
//!
//! u64 quantities (addresses, register values, exit codes) travel as Lua integers by bit pattern:
//! Lua integers are signed 64-bit, so values of 2^63 and above appear negative, exactly as Lua's
//! own hex literals do (`0xffffffffffffffff == -1`). Integral floats are accepted too.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use mlua::{Lua, Table, Value};
use vmcore::{ExitStats, Outcome};

use crate::fail::{bad, Res};

/// 2^63 and 2^64 as floats, the bounds of integral floats that fit in 64 bits.
const TWO_63: f64 = 9_223_372_036_854_775_808.0;
const TWO_64: f64 = 18_446_744_073_709_551_616.0;

/// A u64 (address, register value) from a Lua integer, by bit pattern.
pub(crate) fn bits(v: &Value, what: &str) -> Res<u64> {
    match *v {
        Value::Integer(i) => Ok(i.cast_unsigned()),
        Value::Number(f) if f.fract() == 0.0 && (-TWO_63..TWO_64).contains(&f) => {
            // In range and integral, so these casts are exact.
            Ok(if f < 0.0 { (f as i64).cast_unsigned() } else { f as u64 })
        }
        _ => Err(bad(format!("{what} must be an integer, got {}", describe(v)))),
    }
}

/// A non-negative count or index.
pub(crate) fn count(v: &Value, what: &str) -> Res<usize> {
    let n = match *v {
        Value::Integer(i) => Some(i),
        Value::Number(f) if f.fract() == 0.0 && (-TWO_63..TWO_63).contains(&f) => Some(f as i64),
        _ => None,
    };
    match n {
        Some(n) => usize::try_from(n).map_err(|_| bad(format!("{what} must be >= 0, got {n}"))),
        None => Err(bad(format!("{what} must be an integer, got {}", describe(v)))),
    }
}

/// A vCPU index: 0-based, the vCPU's APIC ID.
pub(crate) fn vcpu(v: &Value) -> Res<usize> {
    count(v, "vcpu (a 0-based vCPU index)")
}


/// Seconds as a `Duration`; `nil` (or `math.huge`) is no limit. A table is read as
/// `{timeout=...}`.
pub(crate) fn timeout(v: &Value, what: &str) -> Res<Option<Duration>> {
    let seconds = match v {
        Value::Nil => return Ok(None),
        Value::Integer(i) => *i as f64,
        Value::Number(f) => *f,
        Value::Table(t) => {
            only_keys(t, what, &["timeout"])?;
            return timeout(&t.raw_get::<Value>("timeout")?, "timeout");
        }
        _ => return Err(bad(format!("{what} must be a number of seconds or nil, got {}", describe(v)))),
    };
    vmcore::vm::timeout_from_seconds(seconds).map_err(|message| bad(format!("{what} {message}")))
}

/// The bytes of a Lua string (Lua strings are byte strings; no encoding is assumed).
pub(crate) fn bytes(v: &Value, what: &str) -> Res<Vec<u8>> {
    match v {
        Value::String(s) => Ok(s.as_bytes().to_vec()),
        _ => Err(bad(format!("{what} must be a string, got {}", describe(v)))),
    }
}

/// A Lua string that must be UTF-8 (patterns, register names).
pub(crate) fn text(v: &Value, what: &str) -> Res<String> {
    match v {
        Value::String(s) => s.to_str().map(|s| s.to_string()).map_err(|_| bad(format!("{what} must be valid UTF-8"))),
        _ => Err(bad(format!("{what} must be a string, got {}", describe(v)))),
    }
}

/// A file path, taken byte for byte.
pub(crate) fn path(v: &Value, what: &str) -> Res<PathBuf> {
    match v {
        Value::String(s) => Ok(PathBuf::from(OsStr::from_bytes(&s.as_bytes()))),
        _ => Err(bad(format!("{what} must be a string (a file path), got {}", describe(v)))),
    }
}

/// An options table (or `nil`), checking that every key is one the call knows, so a typo such
/// as `{adress=...}` is an error instead of silently using the default.
pub(crate) fn options(v: &Value, what: &str, known: &[&str]) -> Res<Option<Table>> {
    match v {
        Value::Nil => Ok(None),
        Value::Table(t) => {
            only_keys(t, what, known)?;
            Ok(Some(t.clone()))
        }
        _ => Err(bad(format!("{what} must be a table of options or nil, got {}", describe(v)))),
    }
}

fn only_keys(t: &Table, what: &str, known: &[&str]) -> Res<()> {
    for pair in t.pairs::<Value, Value>() {
        let (key, _) = pair?;
        let ok = matches!(&key, Value::String(s) if known.iter().any(|k| s.as_bytes().as_ref() == k.as_bytes()));
        if !ok {
            let shown = match &key {
                Value::String(s) => format!("{:?}", s.to_string_lossy()),
                other => describe(other),
            };
            return Err(bad(format!("unknown option {shown} in {what} (known: {})", known.join(", "))));
        }
    }
    Ok(())
}

/// A value's Lua type name, with the value for numbers and short strings, for error messages.
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::Integer(i) => format!("integer {i}"),
        Value::Number(f) => format!("number {f}"),
        Value::String(s) if s.as_bytes().len() <= 40 => format!("string {:?}", s.to_string_lossy()),
        other => other.type_name().to_string(),
    }
}

/// A u64 as a Lua integer, by bit pattern.
pub(crate) fn int(v: u64) -> i64 {
    v.cast_signed()
}

/// An outcome as a plain table; `vmcore.lua` gives it a `__tostring`.
pub(crate) fn outcome(lua: &Lua, o: &Outcome) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("reason", o.reason.as_str())?;
    t.set("code", o.code.map(int))?;
    t.set("vcpu", o.vcpu.map(|v| v as i64))?;
    t.set("rip", o.rip.map(int))?;
    t.set("instruction", lua.create_string(&o.instruction)?)?;
    t.set("detail", o.detail.as_str())?;
    t.set("summary", o.to_string())?;
    t.set("qemu_exit_status", o.qemu_exit_status().map(int))?;
    // hook_stop: the key vmcore.lua keeps the value the hook passed to ev:stop under; it
    // replaces this with that value, as `result`.
    t.set("result_token", crate::hooks::stop_token(o))?;
    Ok(t)
}

/// Exit counters as nested tables keyed by reason name, port or address.
pub(crate) fn stats(lua: &Lua, s: &ExitStats) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("exits", lua.create_table_from(s.exits.iter().map(|(k, v)| (*k, int(*v))))?)?;
    t.set("exits_total", int(s.total_exits()))?;
    let ports = |m: &std::collections::BTreeMap<u16, u64>| {
        lua.create_table_from(m.iter().map(|(k, v)| (i64::from(*k), int(*v))))
    };
    let addrs =
        |m: &std::collections::BTreeMap<u64, u64>| lua.create_table_from(m.iter().map(|(k, v)| (int(*k), int(*v))));
    t.set("ports", ports(&s.ports)?)?;
    t.set("unhandled_port_reads", ports(&s.unhandled_port_reads)?)?;
    t.set("unhandled_port_writes", ports(&s.unhandled_port_writes)?)?;
    t.set("unhandled_mmio_reads", addrs(&s.unhandled_mmio_reads)?)?;
    t.set("unhandled_mmio_writes", addrs(&s.unhandled_mmio_writes)?)?;
    let msrs = |m: &std::collections::BTreeMap<u32, u64>| {
        lua.create_table_from(m.iter().map(|(k, v)| (i64::from(*k), int(*v))))
    };
    t.set("msr_reads", msrs(&s.msr_reads)?)?;
    t.set("msr_writes", msrs(&s.msr_writes)?)?;
    t.set("cpuid_leaves", msrs(&s.cpuid_leaves)?)?;
    t.set("cr_accesses", lua.create_table_from(s.cr_accesses.iter().map(|(k, v)| (i64::from(*k), int(*v))))?)?;
    t.set("emulated", lua.create_table_from(s.emulated.iter().map(|(k, v)| (*k, int(*v))))?)?;
    t.set("hook_events", lua.create_table_from(s.hook_events.iter().map(|(k, v)| (*k, int(*v))))?)?;
    t.set("hook_calls", int(s.hook_calls))?;
    t.set("uncounted_keys", int(s.uncounted_keys))?;
    t.set("console_dropped", int(s.console_dropped))?;
    t.set("hook_seconds", s.hook_time.as_secs_f64())?;
    t.set("handling_seconds", s.handling_time.as_secs_f64())?;
    t.set("emulation_seconds", s.emulation_time.as_secs_f64())?;
    Ok(t)
}
