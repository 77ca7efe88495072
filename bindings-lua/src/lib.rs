//! `vmcore` for Lua 5.4: `local vmcore = require("vmcore")`.
//!
//! Two layers, like the Python package:
//!
//! * this crate's native part (`native.rs`): a userdata around [`vmcore::Vm`] whose methods
//!   translate Lua values to core calls and core results to plain Lua values. It holds no VM
//!   logic. Hooks (`hooks.rs`) run on the Lua thread: vCPU threads send their events to it and
//!   wait, while it serves them during the calls that wait for the guest. Every native call
//!   returns `true, results...` on success or `false, message` on a core error, so nothing raises
//!   through mlua's error objects;
//! * `vmcore.lua`, compiled into the library: the user-facing objects (`Vm`, `Console`,
//!   `Registers`, outcome and match tables). It turns `false, message` into a Lua error whose
//!   message is a plain string, `"vmcore.<Kind>: <core message>"`.
//!
//! See `bindings-lua/README.md` for the Lua API.

mod args;
mod fail;
mod hooks;
mod logs;
mod native;

use mlua::{Lua, Table};

/// The Lua side of the module, run once by `require("vmcore")` with the native table.
const FACADE: &str = include_str!("vmcore.lua");
/// `vmcore.testing`, helpers for busted specs.
const TESTING: &str = include_str!("testing.lua");

#[mlua::lua_module]
fn vmcore(lua: &Lua) -> mlua::Result<Table> {
    logs::install();
    let native = native::module(lua)?;
    lua.load(FACADE).set_name("=vmcore.lua").call(native)
}

/// `require("vmcore.testing")`: Lua's all-in-one loader finds `luaopen_vmcore_testing` in the
/// same library as `vmcore`.
#[mlua::lua_module(name = "vmcore_testing")]
fn vmcore_testing(lua: &Lua) -> mlua::Result<Table> {
    lua.load(TESTING).set_name("=vmcore/testing.lua").call(())
}
