//! How failures reach Lua.
//!
//! A core error becomes the string `"vmcore.<Kind>: <message>"`, returned to `vmcore.lua` as
//! `false, message`; the Lua side raises it with `error(message, 0)`, so Lua code sees a plain
//! string it can match with `err:match("^vmcore%.(%w+):")`. Only failures of the Lua state
//! itself (out of memory while building a result table) travel as mlua errors.

use mlua::{IntoLuaMulti, Lua, MultiValue, Value};
use vmcore::Error;

/// Why a native call failed.
pub(crate) enum Fail {
    /// A vmcore error, already formatted with its kind prefix.
    Core(String),
    /// The Lua state failed (for example, no memory for a result table).
    Lua(mlua::Error),
}

pub(crate) type Res<T> = Result<T, Fail>;

impl From<mlua::Error> for Fail {
    fn from(e: mlua::Error) -> Fail {
        Fail::Lua(e)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Core(format!("vmcore.{}: {e}", e.kind()))
    }
}

/// A bad argument, reported as the core reports bad configuration (`vmcore.ConfigError`).
pub(crate) fn bad(message: impl Into<String>) -> Fail {
    Error::Config(message.into()).into()
}

/// Lifts a core result.
pub(crate) fn core<T>(r: vmcore::Result<T>) -> Res<T> {
    r.map_err(Fail::from)
}

/// The native calling convention: `true, results...` or `false, message`.
pub(crate) fn reply<T: IntoLuaMulti>(lua: &Lua, result: Res<T>) -> mlua::Result<MultiValue> {
    match result {
        Ok(values) => {
            let mut out = values.into_lua_multi(lua)?;
            out.push_front(Value::Boolean(true));
            Ok(out)
        }
        Err(Fail::Core(message)) => (false, message).into_lua_multi(lua),
        Err(Fail::Lua(e)) => Err(e),
    }
}
