//! The native VM handle and module functions that `vmcore.lua` builds on.
//!
//! Each method converts its arguments (`args`), makes one core call, and converts the result.
//! Methods return `true, results...` or `false, "vmcore.<Kind>: message"` (see `fail`). Calls that
//! wait for the guest (`start`, `wait`, `run`, `stop`, `pause`, `console_expect`) take the hook
//! dispatcher from `vmcore.lua` as their last argument and wait through the pump (`hooks`).

use std::cell::RefCell;
use std::sync::Arc;
use std::path::PathBuf;
use std::time::Duration;

use mlua::{AnyUserData, Lua, MultiValue, Table, UserData, UserDataMethods, Value};
use vmcore::boot::LinuxProtocol;
use vmcore::console::Tee;
use vmcore::devices::virtio::net::{format_mac, parse_mac, NetOptions, NetPort};
use vmcore::devices::virtio::VirtioInfo;
use vmcore::memory::parse_size;
use vmcore::{CpuMode, Error, Vm, VmBuilder, VmState};

use crate::args::{self, describe, int};
use crate::fail::{bad, core, reply, Res};
use crate::hooks::{raise_hook_error, FromHook, Pump};

/// `expect` waits this long when no timeout is given, as in Python.
const DEFAULT_EXPECT_SECONDS: f64 = 10.0;
/// Where `load_flat` puts code by default (the guests' link address for protected/long mode).
const DEFAULT_LOAD_ADDRESS: u64 = 0x10_0000;

/// One VM. `None` once closed (see `close`). The garbage collector closes it the same way
/// (mlua's `__gc` drops the Rust value). The `Vm` is shared with the helper thread of a pumped
/// call while that runs.
pub(crate) struct NativeVm {
    vm: RefCell<Option<Arc<Vm>>>,
    pump: Pump,
}

impl Drop for NativeVm {
    fn drop(&mut self) {
        self.close();
    }
}

impl NativeVm {
    fn get(&self) -> Res<Arc<Vm>> {
        self.vm.borrow().clone().ok_or_else(|| Error::State("the VM is closed".into()).into())
    }

    /// Shuts the hook pump, so no vCPU waits for Lua any more, then closes the core `Vm`, which
    /// stops the run and joins its threads; its file descriptors and guest RAM go with the last
    /// reference. From one of its hooks the core only records the close and the run unwinds when
    /// the hook returns; the call that serves the hook holds the last reference until then.
    fn close(&self) {
        let Some(vm) = self.vm.borrow_mut().take() else { return };
        self.pump.close();
        let _serving = self.pump.serving(&vm);
        vm.close();
    }

    /// Makes a core call that may wait for the guest through the hook pump (see `Pump::pumped`).
    fn pumped<T: Send>(
        &self,
        lua: &Lua,
        dispatch: &Value,
        what: &str,
        from_hook: FromHook,
        call: impl FnOnce(&Vm) -> T + Send,
    ) -> Res<T> {
        self.pump.pumped(lua, dispatch, &*self.get()?, what, from_hook, call)
    }

    /// "created", "loaded", "running", "paused", "ended" or "closed".
    fn state(&self) -> &'static str {
        self.vm.borrow().as_ref().map_or(VmState::Closed.name(), |vm| vm.state().name())
    }

    fn build(opts: &Value) -> Res<NativeVm> {
        let opts = args::options(opts, "vmcore.Vm{...}", &["memory", "vcpus", "tee", "precise", "console_limit"])?;
        let mut builder = VmBuilder::new();
        if let Some(t) = opts {
            builder = match t.raw_get::<Value>("memory")? {
                Value::Nil => builder,
                Value::String(s) => builder.memory(core(parse_size(&s.to_string_lossy()))?),
                v @ (Value::Integer(_) | Value::Number(_)) => builder.memory(args::count(&v, "memory")? as u64),
                v => {
                    return Err(bad(format!(
                        "memory must be an integer (bytes) or a size like \"64M\", got {}",
                        describe(&v)
                    )))
                }
            };
            builder = match t.raw_get::<Value>("vcpus")? {
                Value::Nil => builder,
                v => builder.vcpus(args::count(&v, "vcpus")?),
            };
            builder = match t.raw_get::<Value>("console_limit")? {
                Value::Nil => builder,
                v => builder.console_limit(args::count(&v, "console_limit (bytes)")?),
            };
            builder = match t.raw_get::<Value>("tee")? {
                Value::Nil | Value::Boolean(false) => builder,
                Value::String(s) => builder.tee(Some(Tee::parse(&s.to_string_lossy()))),
                v => {
                    return Err(bad(format!("tee must be \"stdout\", \"stderr\" or a file path, got {}", describe(&v))))
                }
            };
            builder = match t.raw_get::<Value>("precise")? {
                Value::Nil => builder,
                v => builder.precise_mode(core(args::text(&v, "precise")?.parse())?),
            };
        }
        Ok(NativeVm { vm: RefCell::new(Some(Arc::new(core(builder.build())?))), pump: Pump::new() })
    }

    /// Returns the entry address.
    fn load_flat(&self, code: &Value, opts: &Value) -> Res<i64> {
        let code = args::bytes(code, "code")?;
        let opts = args::options(opts, "load_flat options", &["address", "mode"])?;
        let (mut address, mut mode) = (DEFAULT_LOAD_ADDRESS, CpuMode::Long);
        if let Some(t) = opts {
            let a = t.raw_get::<Value>("address")?;
            if !a.is_nil() {
                address = args::bits(&a, "address")?;
            }
            let m = t.raw_get::<Value>("mode")?;
            if !m.is_nil() {
                mode = core(args::text(&m, "mode")?.parse())?;
            }
        }
        self.pump.refuse_in_static_cpuid("load an image")?;
        let entry = core(self.get()?.load_flat(&code, address, mode))?;
        Ok(int(entry.address))
    }

    /// Returns the entry address.
    fn load_elf(&self, path: &Value) -> Res<i64> {
        let path = args::path(path, "path")?;
        self.pump.refuse_in_static_cpuid("load an image")?;
        let entry = core(self.get()?.load_elf(&path))?;
        Ok(int(entry.address))
    }

    /// Returns the entry address. `opts`: `{cmdline = "...", modules = {"path", {"path", "args"}, ...}}`.
    fn load_multiboot(&self, path: &Value, opts: &Value) -> Res<i64> {
        let (path, cmdline, modules) = kernel_args(path, opts, "load_multiboot")?;
        self.pump.refuse_in_static_cpuid("load an image")?;
        let entry = core(self.get()?.load_multiboot(&path, &cmdline, &modules))?;
        Ok(int(entry.address))
    }

    /// Like `load_multiboot`, for a kernel of either kind (multiboot or ELF), by its contents.
    fn load_kernel(&self, path: &Value, opts: &Value) -> Res<i64> {
        let (path, cmdline, modules) = kernel_args(path, opts, "load_kernel")?;
        self.pump.refuse_in_static_cpuid("load an image")?;
        let entry = core(self.get()?.load_kernel(&path, &cmdline, &modules))?;
        Ok(int(entry.address))
    }

    /// Loads a Linux kernel: `opts` may give `initrd`, `cmdline` (default "console=ttyS0"),
    /// `protocol` ("auto", "linux64", "pvh") and `decompress` (default true). Returns what was
    /// booted as a table.
    fn load_linux(&self, lua: &Lua, kernel: &Value, opts: &Value) -> Res<Table> {
        let kernel = args::path(kernel, "kernel")?;
        let opts = args::options(opts, "load_linux options", &["initrd", "cmdline", "protocol", "decompress", "adapt_to_host"])?;
        let (mut initrd, mut cmdline, mut protocol) = (None, "console=ttyS0".to_string(), LinuxProtocol::Auto);
        let (mut decompress, mut adapt_to_host) = (true, true);
        if let Some(t) = opts {
            match t.raw_get::<Value>("initrd")? {
                Value::Nil => {}
                v => initrd = Some(args::path(&v, "initrd")?),
            }
            match t.raw_get::<Value>("cmdline")? {
                Value::Nil => {}
                v => cmdline = args::text(&v, "cmdline")?,
            }
            match t.raw_get::<Value>("protocol")? {
                Value::Nil => {}
                v => protocol = core(args::text(&v, "protocol")?.parse())?,
            }
            for (key, flag) in [("decompress", &mut decompress), ("adapt_to_host", &mut adapt_to_host)] {
                match t.raw_get::<Value>(key)? {
                    Value::Nil => {}
                    Value::Boolean(b) => *flag = b,
                    v => return Err(bad(format!("{key} must be a boolean, got {}", describe(&v)))),
                }
            }
        }
        self.pump.refuse_in_static_cpuid("load an image")?;
        let k = core(self.get()?.load_linux(&kernel, initrd.as_deref(), &cmdline, protocol, decompress, adapt_to_host))?;
        let t = lua.create_table()?;
        t.raw_set("format", k.format)?;
        t.raw_set("version", k.version)?;
        t.raw_set("compression", k.compression.map(|c| c.as_str()))?;
        t.raw_set("protocol", k.protocol.as_str())?;
        t.raw_set("cmdline", k.cmdline)?;
        t.raw_set("entry", int(k.image.entry.address))?;
        t.raw_set("kernel", lua.create_sequence_from([int(k.kernel.0), int(k.kernel.1)])?)?;
        if let Some((at, len)) = k.initrd {
            t.raw_set("initrd", lua.create_sequence_from([int(at), int(len)])?)?;
        }
        Ok(t)
    }

    fn add_fw_cfg_file(&self, name: &Value, data: &Value) -> Res<()> {
        let (name, data) = (args::text(name, "name")?, args::bytes(data, "data")?);
        core(self.get()?.add_fw_cfg_file(&name, data))
    }

    fn add_disk(&self, lua: &Lua, path: &Value, opts: &Value) -> Res<Table> {
        let path = args::path(path, "path")?;
        let opts = args::options(opts, "add_disk options", &["readonly", "serial"])?;
        let (mut readonly, mut serial) = (false, None);
        if let Some(t) = opts {
            readonly = match t.raw_get::<Value>("readonly")? {
                Value::Nil => false,
                Value::Boolean(b) => b,
                v => return Err(bad(format!("readonly must be a boolean, got {}", describe(&v)))),
            };
            let s = t.raw_get::<Value>("serial")?;
            if !s.is_nil() {
                serial = Some(args::text(&s, "serial")?);
            }
        }
        let info = core(self.get()?.add_disk(&path, readonly, serial.as_deref()))?;
        Ok(virtio_table(lua, &info)?)
    }

    fn add_net(&self, lua: &Lua, opts: &Value) -> Res<Table> {
        let opts = args::options(opts, "add_net options", &["tap", "mac", "on_packet"])?;
        let mut options = NetOptions::default();
        if let Some(t) = opts {
            let tap = t.raw_get::<Value>("tap")?;
            if !tap.is_nil() {
                options.tap = Some(args::text(&tap, "tap")?);
            }
            let mac = t.raw_get::<Value>("mac")?;
            if !mac.is_nil() {
                options.mac = Some(core(parse_mac(&args::text(&mac, "mac")?))?);
            }
        }
        let (info, port) = core(self.get()?.add_net(&options))?;
        let t = virtio_table(lua, &info)?;
        t.raw_set("mac", format_mac(&port.mac()))?;
        t.raw_set("tap", port.tap())?;
        Ok(t)
    }

    /// The serial console (`port` nil) or the console of virtio device `port`.
    fn console(&self, port: &Value) -> Res<Arc<vmcore::console::Console>> {
        let port = match port {
            Value::Nil => None,
            index => Some(args::count(index, "console index")?),
        };
        core(self.get()?.console_port(port))
    }

    fn net(&self, index: &Value) -> Res<Arc<NetPort>> {
        core(self.get()?.net_port(args::count(index, "device index")?))
    }

    /// Refuses lengths no read could satisfy before allocating a buffer for them.
    fn check_length(&self, length: usize) -> Res<()> {
        let size = self.get()?.memory_size();
        if length as u64 > size {
            return Err(Error::Memory(format!("cannot read {length} bytes: the guest has {size} bytes of RAM")).into());
        }
        Ok(())
    }
}

/// A virtio device's description as a table.
fn virtio_table(lua: &Lua, info: &VirtioInfo) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set("index", info.index as i64)?;
    t.raw_set("kind", info.kind())?;
    t.raw_set("base", int(info.base))?;
    t.raw_set("gsi", i64::from(info.gsi))?;
    t.raw_set("description", info.description.as_str())?;
    Ok(t)
}

/// A kernel's path, command line, and modules as (path, arguments) pairs.
type KernelArgs = (PathBuf, String, Vec<(PathBuf, String)>);

/// A kernel path and its options: the command line and the modules, each a path or a
/// `{path, args}` pair.
fn kernel_args(path: &Value, opts: &Value, what: &str) -> Res<KernelArgs> {
    let path = args::path(path, "path")?;
    let opts = args::options(opts, &format!("{what} options"), &["cmdline", "modules"])?;
    let (mut cmdline, mut modules) = (String::new(), Vec::new());
    if let Some(t) = opts {
        let c = t.raw_get::<Value>("cmdline")?;
        if !c.is_nil() {
            cmdline = args::text(&c, "cmdline")?;
        }
        match t.raw_get::<Value>("modules")? {
            Value::Nil => {}
            Value::Table(list) => {
                for entry in list.sequence_values::<Value>() {
                    modules.push(match entry? {
                        Value::Table(pair) => {
                            let module_args = pair.raw_get::<Value>(2)?;
                            let module_args =
                                if module_args.is_nil() { String::new() } else { args::text(&module_args, "module arguments")? };
                            (args::path(&pair.raw_get::<Value>(1)?, "module path")?, module_args)
                        }
                        other => (args::path(&other, "module")?, String::new()),
                    });
                }
            }
            v => return Err(bad(format!("modules must be a list of paths or {{path, args}} pairs, got {}", describe(&v)))),
        }
    }
    Ok((path, cmdline, modules))
}

/// Registers a native method: converts the result to the `true, ...` / `false, message` form.
fn method<M, A, R, F>(methods: &mut M, name: &str, f: F)
where
    M: UserDataMethods<NativeVm>,
    A: mlua::FromLuaMulti,
    R: mlua::IntoLuaMulti,
    F: Fn(&Lua, &NativeVm, A) -> Res<R> + 'static,
{
    methods.add_method(name, move |lua, this, a: A| reply(lua, f(lua, this, a)));
}

impl UserData for NativeVm {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        method(m, "memory_size", |_, this, ()| Ok(int(this.get()?.memory_size())));
        method(m, "vcpu_count", |_, this, ()| Ok(this.get()?.vcpu_count() as i64));
        method(m, "breakpoint_capacity", |_, this, ()| Ok(this.get()?.breakpoint_capacity() as i64));
        method(m, "is_running", |_, this, ()| {
            this.pump.refuse_in_static_cpuid("ask whether the VM is running")?;
            Ok(this.get()?.is_running())
        });
        method(m, "closed", |_, this, ()| Ok(this.vm.borrow().is_none()));
        method(m, "state", |_, this, ()| Ok(this.state()));
        method(m, "outcome", |lua, this, ()| {
            this.pump.refuse_in_static_cpuid("read the outcome")?;
            Ok(this.get()?.outcome().map(|o| args::outcome(lua, &o)).transpose()?)
        });

        method(m, "load_flat", |_, this, (code, opts): (Value, Value)| this.load_flat(&code, &opts));
        method(m, "load_elf", |_, this, path: Value| this.load_elf(&path));
        method(m, "load_multiboot", |_, this, (path, opts): (Value, Value)| this.load_multiboot(&path, &opts));
        method(m, "load_kernel", |_, this, (path, opts): (Value, Value)| this.load_kernel(&path, &opts));
        method(m, "load_linux", |lua, this, (kernel, opts): (Value, Value)| this.load_linux(lua, &kernel, &opts));
        method(m, "add_fw_cfg_file", |_, this, (name, data): (Value, Value)| this.add_fw_cfg_file(&name, &data));

        method(m, "add_disk", |lua, this, (path, opts): (Value, Value)| this.add_disk(lua, &path, &opts));
        method(m, "add_rng", |lua, this, ()| Ok(virtio_table(lua, &core(this.get()?.add_rng())?)?));
        method(m, "add_net", |lua, this, opts: Value| this.add_net(lua, &opts));
        method(m, "virtio_devices", |lua, this, ()| {
            let list = lua.create_table()?;
            for (i, info) in this.get()?.virtio_devices().iter().enumerate() {
                list.raw_set(i + 1, virtio_table(lua, info)?)?;
            }
            Ok(list)
        });
        method(m, "net_inject", |_, this, (index, frame): (Value, Value)| {
            let frame = args::bytes(&frame, "frame")?;
            core(this.net(&index)?.inject(&frame))
        });
        method(m, "net_link", |_, this, (index, other, other_index): (Value, AnyUserData, Value)| {
            let a = this.net(&index)?;
            let other = other.borrow::<NativeVm>().map_err(|_| bad("link needs another vmcore network device"))?;
            let b = other.net(&other_index)?;
            NetPort::link(&a, &b);
            Ok(())
        });
        method(m, "net_unlink", |_, this, index: Value| {
            this.net(&index)?.unlink();
            Ok(())
        });
        method(m, "net_stats", |lua, this, index: Value| {
            let s = this.net(&index)?.stats();
            let t = lua.create_table()?;
            t.raw_set("tx_frames", int(s.tx_frames))?;
            t.raw_set("tx_dropped", int(s.tx_dropped))?;
            t.raw_set("rx_frames", int(s.rx_frames))?;
            t.raw_set("rx_dropped", int(s.rx_dropped))?;
            Ok(t)
        });
        // A Lua filter: frames wait for the Lua thread (see `Pump::packet_filter`); returns the
        // id the dispatcher finds the function by. With `false`, the filter is removed.
        method(m, "net_filter", |_, this, (index, on): (Value, bool)| {
            let port = this.net(&index)?;
            if !on {
                port.set_filter(None);
                return Ok(None);
            }
            Ok(Some(this.pump.packet_filter(&port)))
        });

        // A hook that raised ends the run with "hook_error"; run and wait raise its message
        // (once: afterwards the outcome is returned, as by vm.outcome and stop).
        method(m, "start", |lua, this, (t, dispatch): (Value, Value)| {
            let t = args::timeout(&t, "start timeout")?;
            core(this.pumped(lua, &dispatch, "start the VM", FromHook::Refuse, |vm| vm.start(t))?)
        });
        method(m, "wait", |lua, this, (t, dispatch): (Value, Value)| {
            let t = args::timeout(&t, "wait timeout")?;
            let outcome = core(this.pumped(lua, &dispatch, "wait for the VM", FromHook::Refuse, |vm| vm.wait(t))?)?;
            if let Some(o) = &outcome {
                raise_hook_error(o)?;
            }
            Ok(outcome.map(|o| args::outcome(lua, &o)).transpose()?)
        });
        method(m, "run", |lua, this, (t, dispatch): (Value, Value)| {
            let t = args::timeout(&t, "run timeout")?;
            let outcome = core(this.pumped(lua, &dispatch, "run the VM", FromHook::Refuse, |vm| vm.run(t))?)?;
            raise_hook_error(&outcome)?;
            Ok(args::outcome(lua, &outcome)?)
        });
        // From a hook of this VM, stop and pause take effect when the hook returns (stop then
        // returns nil: the run has not ended yet).
        method(m, "stop", |lua, this, dispatch: Value| {
            let outcome = core(this.pumped(lua, &dispatch, "stop the VM", FromHook::Record, |vm| vm.stop())?)?;
            Ok(outcome.map(|o| args::outcome(lua, &o)).transpose()?)
        });
        method(m, "pause", |lua, this, dispatch: Value| {
            core(this.pumped(lua, &dispatch, "pause the VM", FromHook::Record, |vm| vm.pause())?)
        });
        // Only starts the vCPUs (no static CPUID hooks run: the VM has run before), so nothing
        // here waits for a hook.
        method(m, "resume", |_, this, ()| core(this.get()?.resume()));
        method(m, "close", |_, this, ()| {
            this.close();
            Ok(())
        });

        method(m, "add_hook", |_, this, (kind, params, opts): (Value, Value, Value)| {
            this.pump.add(&*this.get()?, &kind, &params, &opts)
        });
        method(m, "remove_hook", |_, this, id: Value| this.pump.remove(&*this.get()?, &id));
        method(m, "cpuid_ignored", |lua, this, ()| {
            let list = lua.create_table()?;
            for (i, c) in this.get()?.cpuid_ignored().into_iter().enumerate() {
                let t = lua.create_table()?;
                t.set("vcpu", c.vcpu as i64)?;
                t.set("leaf", i64::from(c.leaf))?;
                t.set("subleaf", i64::from(c.subleaf))?;
                t.set("wanted", lua.create_sequence_from(c.wanted.map(i64::from))?)?;
                t.set("kept", c.kept.map(|k| lua.create_sequence_from(k.map(i64::from))).transpose()?)?;
                list.raw_set(i + 1, t)?;
            }
            Ok(list)
        });

        method(m, "console_output", |lua, this, port: Value| Ok(lua.create_string(this.console(&port)?.output())?));
        method(m, "console_output_bytes", |lua, this, port: Value| {
            Ok(lua.create_string(this.console(&port)?.output_bytes())?)
        });
        method(m, "console_tail", |lua, this, port: Value| Ok(lua.create_string(this.console(&port)?.tail())?));
        method(m, "console_dropped", |_, this, port: Value| Ok(int(this.console(&port)?.dropped() as u64)));
        method(m, "console_send", |_, this, (data, port): (Value, Value)| {
            let data = args::bytes(&data, "data")?;
            core(this.console(&port)?.send(&data))
        });
        method(m, "add_console", |lua, this, ()| Ok(virtio_table(lua, &core(this.get()?.add_console())?.0)?));
        method(m, "console_expect", |lua, this, (pattern, t, dispatch, port): (Value, Value, Value, Value)| {
            let pattern = args::text(&pattern, "pattern")?;
            let t = match t {
                Value::Nil => Value::Number(DEFAULT_EXPECT_SECONDS),
                other => other,
            };
            let forever = Duration::from_secs_f64(vmcore::vm::FOREVER_SECONDS);
            let t = args::timeout(&t, "expect timeout")?.unwrap_or(forever);
            let console = this.console(&port)?;
            let found = core(this.pumped(lua, &dispatch, "wait for console output", FromHook::Refuse, |_| {
                console.expect(&pattern, t)
            })?)?;
            Ok(match_table(lua, found)?)
        });

        method(m, "registers", |lua, this, vcpu: Value| {
            let regs = core(this.get()?.registers(args::vcpu(&vcpu)?))?;
            Ok(lua.create_table_from(regs.to_pairs().into_iter().map(|(k, v)| (k, int(v))))?)
        });
        method(m, "register", |_, this, (vcpu, name): (Value, Value)| {
            let vcpu = args::vcpu(&vcpu)?;
            let name = register_name(&name)?;
            Ok(int(core(core(this.get()?.registers(vcpu))?.get(&name))?))
        });
        method(m, "set_register", |_, this, (vcpu, name, value): (Value, Value, Value)| {
            let vcpu = args::vcpu(&vcpu)?;
            let name = register_name(&name)?;
            let value = args::bits(&value, &format!("the value for register {name}"))?;
            core(this.get()?.set_register(vcpu, &name, value))
        });

        method(m, "read_phys", |lua, this, (address, length): (Value, Value)| {
            let address = args::bits(&address, "address")?;
            let length = args::count(&length, "length")?;
            this.check_length(length)?;
            Ok(lua.create_string(core(this.get()?.read_phys(address, length))?)?)
        });
        method(m, "write_phys", |_, this, (address, data): (Value, Value)| {
            let address = args::bits(&address, "address")?;
            let data = args::bytes(&data, "data")?;
            core(this.get()?.write_phys(address, &data))
        });
        method(m, "read_virt", |lua, this, (vcpu, address, length): (Value, Value, Value)| {
            let vcpu = args::vcpu(&vcpu)?;
            let address = args::bits(&address, "address")?;
            let length = args::count(&length, "length")?;
            this.check_length(length)?;
            Ok(lua.create_string(core(this.get()?.read_virt(vcpu, address, length))?)?)
        });
        method(m, "write_virt", |_, this, (vcpu, address, data): (Value, Value, Value)| {
            let vcpu = args::vcpu(&vcpu)?;
            let address = args::bits(&address, "address")?;
            let data = args::bytes(&data, "data")?;
            core(this.get()?.write_virt(vcpu, address, &data))
        });
        method(m, "translate", |_, this, (vcpu, address): (Value, Value)| {
            let vcpu = args::vcpu(&vcpu)?;
            let address = args::bits(&address, "address")?;
            Ok(int(core(this.get()?.translate(vcpu, address))?))
        });
        method(m, "stats", |lua, this, ()| Ok(args::stats(lua, &this.get()?.stats())?));
        method(m, "sample_rip", |_, this, on: Option<bool>| {
            this.get()?.sample_rip(on.unwrap_or(true));
            Ok(())
        });
        method(m, "rip_samples", |lua, this, ()| {
            let t = lua.create_table()?;
            for (rip, count) in this.get()?.rip_samples() {
                t.set(int(rip), int(count))?;
            }
            Ok(t)
        });
        method(m, "clear_rip_samples", |_, this, ()| {
            this.get()?.clear_rip_samples();
            Ok(())
        });
        method(m, "profile", |lua, this, symbol_map: Value| {
            let path = args::path(&symbol_map, "symbol_map")?;
            let text = std::fs::read(&path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
            let ranked = core(this.get()?.profile(&String::from_utf8_lossy(&text)))?;
            let t = lua.create_table()?;
            for (function, samples) in ranked {
                let row = lua.create_table()?;
                row.set("func", function)?;
                row.set("samples", int(samples))?;
                t.push(row)?;
            }
            Ok(t)
        });
    }
}

/// A register name; anything else is reported the way the core reports an unknown name.
fn register_name(v: &Value) -> Res<String> {
    match v {
        Value::String(s) => Ok(s.to_string_lossy()),
        other => {
            Err(bad(format!("unknown register {}; known: {}", describe(other), vmcore::cpu::REGISTER_NAMES.join(", "))))
        }
    }
}

/// A console match for Lua: `start` and `end` are 1-based and inclusive, like `string.find`,
/// so `vm.console.output_bytes:sub(m.start, m["end"]) == m.text` for ASCII output. `groups` holds
/// the capture groups from 1 (`n` is their count; a group that did not take part is `nil`) and
/// `named` the named groups that took part.
fn match_table(lua: &Lua, found: vmcore::console::Match) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("text", found.text)?;
    t.set("start", found.start as i64 + 1)?;
    t.set("end", found.end as i64)?;
    let groups = lua.create_table()?;
    let named = lua.create_table()?;
    let captures = found.groups.len().saturating_sub(1);
    for (i, (group, name)) in found.groups.into_iter().zip(found.names).enumerate().skip(1) {
        if let Some(text) = group {
            if let Some(name) = name {
                named.set(name, text.as_str())?;
            }
            groups.set(i, text)?;
        }
    }
    groups.set("n", captures)?;
    t.set("groups", groups)?;
    t.set("named", named)?;
    Ok(t)
}

/// The native module table passed to `vmcore.lua`.
pub(crate) fn module(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "new_vm",
        lua.create_function(|lua, opts: Value| -> mlua::Result<MultiValue> { reply(lua, NativeVm::build(&opts)) })?,
    )?;
    t.set(
        "parse_memory_size",
        lua.create_function(|lua, text: Value| -> mlua::Result<MultiValue> {
            let parsed = args::text(&text, "size").and_then(|s| core(parse_size(&s)).map(int));
            reply(lua, parsed)
        })?,
    )?;
    t.set(
        "set_log_level",
        lua.create_function(|lua, level: Value| -> mlua::Result<MultiValue> {
            reply(lua, args::text(&level, "level").and_then(|l| crate::logs::set_level(&l)))
        })?,
    )?;
    t.set("logs", lua.create_function(|lua, ()| crate::logs::take(lua))?)?;
    t.set("REGISTER_NAMES", lua.create_sequence_from(vmcore::cpu::REGISTER_NAMES.iter().copied())?)?;
    t.set("version", env!("CARGO_PKG_VERSION"))?;
    // A monotonic wall clock in seconds (Lua's own os.clock is CPU time), for timing runs.
    let origin = std::time::Instant::now();
    t.set("monotonic", lua.create_function(move |_, ()| Ok(origin.elapsed().as_secs_f64()))?)?;
    Ok(t)
}
