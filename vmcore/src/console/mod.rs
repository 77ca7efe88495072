//! What the guest prints and what it is sent.
//!
//! The newest [`DEFAULT_LIMIT`] bytes the guest transmits are kept (a limit settable per VM; a
//! Linux boot log is about 100 KiB), optionally teed, every byte, to stdout, stderr or a file.
//! Older bytes are dropped and counted, so a guest printing in a loop cannot grow the host
//! without bound (a virtio-console flood grew it by 936 MiB in 2 s). Offsets (matches,
//! [`Console::read_from`]) count from the first byte ever printed, dropped ones included.
//! [`Console::expect`] waits for a regular expression the way pexpect does: each match consumes
//! the output up to its end, so successive calls walk forward.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use regex::bytes::Regex;

use crate::devices::lock;
use crate::{Error, Result};

/// Where to copy console output as it arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tee {
    Stdout,
    Stderr,
    File(PathBuf),
}

impl Tee {
    /// `"stdout"`, `"stderr"`, or a file path.
    pub fn parse(spec: &str) -> Tee {
        match spec {
            "stdout" | "-" => Tee::Stdout,
            "stderr" => Tee::Stderr,
            path => Tee::File(path.into()),
        }
    }

    fn open(&self) -> Result<Box<dyn Write + Send>> {
        Ok(match self {
            Tee::Stdout => Box::new(io::stdout()),
            Tee::Stderr => Box::new(io::stderr()),
            Tee::File(path) => Box::new(File::create(path).map_err(|e| Error::Io {
                context: format!("cannot open console log {}", path.display()),
                source: e,
            })?),
        })
    }
}

/// How many bytes sent to the guest may wait for it to read them, per console. A caller that
/// sends more is told so, and nothing of that send is queued: 10 MB sent to a guest that never
/// read stayed in the host's memory after the VM ended.
pub const INPUT_LIMIT: usize = 1 << 20;

/// Something that takes bytes for the guest (the UART receiver).
pub trait ConsoleInput: Send {
    /// Queues all of `bytes` for the guest, or none of them if more than [`INPUT_LIMIT`] would
    /// then wait; `Err` carries how many are waiting.
    fn feed(&mut self, bytes: &[u8]) -> std::result::Result<(), usize>;
}

/// A successful [`Console::expect`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match {
    /// The matched text.
    pub text: String,
    /// Byte offsets of the match in the whole console output.
    pub start: usize,
    pub end: usize,
    /// Capture groups (index 0 is the whole match); `None` for a group that did not take part.
    pub groups: Vec<Option<String>>,
    /// Names of the capture groups, parallel to `groups`.
    pub names: Vec<Option<String>>,
}

/// How many bytes of output a console keeps by default: the newest 16 MiB.
pub const DEFAULT_LIMIT: usize = 16 << 20;

struct OutputState {
    /// The kept output: the bytes from offset `dropped` on.
    bytes: Vec<u8>,
    /// How many of the oldest bytes were let go to keep within `limit`.
    dropped: usize,
    /// How many bytes to keep. Trimming waits until an eighth more has arrived, so a flood
    /// moves each byte a bounded number of times (memory stays below 1.125 x `limit`).
    limit: usize,
    /// Where the next `expect` starts searching (an offset, as `dropped` counts).
    cursor: usize,
    /// Whether the VM is running, so more output may come.
    live: bool,
    /// Why no more output will come, when not live.
    status: String,
    tee: Option<Box<dyn Write + Send>>,
    tee_error: Option<String>,
}

struct Shared {
    state: Mutex<OutputState>,
    grew: Condvar,
}

pub struct Console {
    shared: Arc<Shared>,
    input: Mutex<Option<Arc<Mutex<dyn ConsoleInput>>>>,
}

/// The device side of the console: implements `Write` for the UART's transmitter.
pub struct ConsoleWriter(Arc<Shared>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut st = lock(&self.0.state);
        st.bytes.extend_from_slice(buf);
        if st.bytes.len() > st.limit + st.limit / 8 {
            let excess = st.bytes.len() - st.limit;
            st.bytes.drain(..excess);
            st.dropped += excess;
        }
        let mut lost_tee = None;
        if let Some(tee) = st.tee.as_mut() {
            if let Err(e) = tee.write_all(buf).and_then(|_| tee.flush()) {
                // Keep the guest running and the buffer complete; report the lost tee once.
                st.tee_error = Some(e.to_string());
                st.tee = None;
                lost_tee = Some(e);
            }
        }
        drop(st);
        self.0.grew.notify_all();
        if let Some(e) = lost_tee {
            log::warn!("console tee stopped: {e}");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const TAIL_CHARS: usize = 2000;

impl Console {
    /// A console that keeps the newest `limit` bytes of output (at least 1).
    pub fn new(tee: Option<&Tee>, limit: usize) -> Result<Console> {
        let tee = tee.map(Tee::open).transpose()?;
        Ok(Console {
            shared: Arc::new(Shared {
                state: Mutex::new(OutputState {
                    bytes: Vec::new(),
                    dropped: 0,
                    limit: limit.max(1),
                    cursor: 0,
                    live: false,
                    status: "not started".into(),
                    tee,
                    tee_error: None,
                }),
                grew: Condvar::new(),
            }),
            input: Mutex::new(None),
        })
    }

    /// A writer for the transmitting device.
    pub fn writer(&self) -> ConsoleWriter {
        ConsoleWriter(self.shared.clone())
    }

    /// Connects the receiving device that [`Console::send`] feeds.
    pub fn attach_input(&self, input: Arc<Mutex<dyn ConsoleInput>>) {
        *lock(&self.input) = Some(input);
    }

    /// How many bytes of output it keeps.
    pub fn limit(&self) -> usize {
        lock(&self.shared.state).limit
    }

    /// How many of the oldest bytes of output were dropped to keep within the limit.
    pub fn dropped(&self) -> usize {
        lock(&self.shared.state).dropped
    }

    /// The kept output (everything the guest printed, unless more than the limit), decoded as
    /// UTF-8 (invalid bytes become U+FFFD).
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&lock(&self.shared.state).bytes).into_owned()
    }

    /// The kept output's raw bytes.
    pub fn output_bytes(&self) -> Vec<u8> {
        lock(&self.shared.state).bytes.clone()
    }

    /// The output from byte `offset` on, waiting up to `timeout` for some to arrive, and the
    /// offset it starts at: `offset`, or the oldest kept byte's if those from `offset` were
    /// dropped. Returns nothing if none came in time or the VM is not running; for streaming
    /// output somewhere (a pty, a notebook) without copying all of it each time.
    pub fn read_from(&self, offset: usize, timeout: Duration) -> (usize, Vec<u8>) {
        let deadline = crate::deadline(Some(timeout));
        let mut st = lock(&self.shared.state);
        loop {
            let start = offset.max(st.dropped);
            if st.dropped + st.bytes.len() > start {
                return (start, st.bytes[start - st.dropped..].to_vec());
            }
            let now = Instant::now();
            if !st.live || deadline.is_some_and(|d| now >= d) {
                return (start, Vec::new());
            }
            let wait = deadline.map_or(Duration::from_millis(100), |d| d - now);
            st = self.shared.grew.wait_timeout(st, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Whether the VM is running, so more output may come.
    pub fn is_live(&self) -> bool {
        lock(&self.shared.state).live
    }

    /// The last ~2000 characters of output, for error messages.
    pub fn tail(&self) -> String {
        tail_of(&lock(&self.shared.state).bytes)
    }

    /// Why teeing stopped, if writing to the tee failed.
    pub fn tee_error(&self) -> Option<String> {
        lock(&self.shared.state).tee_error.clone()
    }

    /// Sends bytes to the guest's receiver. Bytes it cannot take yet wait, up to [`INPUT_LIMIT`];
    /// a send that would go past that is refused whole.
    pub fn send(&self, bytes: &[u8]) -> Result<()> {
        match lock(&self.input).as_ref() {
            Some(input) => lock(input).feed(bytes).map_err(|waiting| {
                Error::State(format!(
                    "the guest has not yet read {waiting} bytes sent earlier and at most {INPUT_LIMIT} may wait, \
                     so none of these {} were sent; send again once it reads",
                    bytes.len()
                ))
            }),
            None => Err(Error::State("this console has no input device".into())),
        }
    }

    /// Marks the VM running (more output may come) or ended with `status`.
    pub(crate) fn set_live(&self, live: bool, status: &str) {
        let mut st = lock(&self.shared.state);
        st.live = live;
        st.status = status.to_string();
        drop(st);
        self.shared.grew.notify_all();
    }

    /// Waits up to `timeout` for `pattern` (Rust `regex` syntax) in the output after the previous
    /// match, and consumes the output up to the end of this one.
    pub fn expect(&self, pattern: &str, timeout: Duration) -> Result<Match> {
        self.expect_while(pattern, timeout, || true)
    }

    /// [`Console::expect`], asking `keep_waiting` about every 100 ms whether to go on; when it
    /// says no, returns [`Error::Interrupted`]. Bindings use it to honour Ctrl-C.
    pub fn expect_while(&self, pattern: &str, timeout: Duration, mut keep_waiting: impl FnMut() -> bool) -> Result<Match> {
        const POLL: Duration = Duration::from_millis(100);
        let re = Regex::new(pattern)
            .map_err(|e| Error::Pattern { pattern: pattern.into(), reason: e.to_string() })?;
        let start = Instant::now();
        let deadline = crate::deadline(Some(timeout));
        let mut st = lock(&self.shared.state);
        let mut searched_to = st.cursor;
        loop {
            // Resume a little before where the last search stopped, so a match straddling the
            // old end is found without rescanning all of a long boot log (a match longer than
            // the 4 KiB overlap may then be found shortened at its start).
            // Offsets count dropped bytes; output dropped before it was searched is not.
            let from = searched_to.saturating_sub(4096).max(st.cursor).max(st.dropped);
            if let Some(caps) = re.captures_at(&st.bytes, from - st.dropped) {
                let whole = caps.get(0).expect("group 0 always exists");
                let found = Match {
                    text: String::from_utf8_lossy(whole.as_bytes()).into_owned(),
                    start: st.dropped + whole.start(),
                    end: st.dropped + whole.end(),
                    groups: caps
                        .iter()
                        .map(|g| g.map(|g| String::from_utf8_lossy(g.as_bytes()).into_owned()))
                        .collect(),
                    names: re.capture_names().map(|n| n.map(str::to_string)).collect(),
                };
                st.cursor = found.end;
                return Ok(found);
            }
            searched_to = st.dropped + st.bytes.len();
            if !st.live {
                return Err(Error::ConsoleEnded {
                    pattern: pattern.into(),
                    outcome: st.status.clone(),
                    tail: tail_of(&st.bytes),
                });
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Error::ConsoleTimeout {
                    pattern: pattern.into(),
                    waited: now - start,
                    tail: tail_of(&st.bytes),
                });
            }
            if !keep_waiting() {
                return Err(Error::Interrupted);
            }
            st = self
                .shared
                .grew
                .wait_timeout(st, deadline.map_or(POLL, |d| (d - now).min(POLL)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

fn tail_of(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let skip = text.chars().count().saturating_sub(TAIL_CHARS);
    text.chars().skip(skip).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn print(c: &Console, s: &str) {
        c.writer().write_all(s.as_bytes()).unwrap();
    }

    #[test]
    fn expect_walks_forward_and_reports_groups() {
        let c = Console::new(None, DEFAULT_LIMIT).unwrap();
        c.set_live(true, "running");
        print(&c, "boot 1\nvalue=42 ok\nboot 2\n");
        let m = c.expect(r"boot (\d)", Duration::from_secs(1)).unwrap();
        assert_eq!(m.groups[1].as_deref(), Some("1"));
        let m = c.expect(r"value=(?P<v>\d+)", Duration::from_secs(1)).unwrap();
        assert_eq!(m.groups[1].as_deref(), Some("42"));
        assert_eq!(m.names[1].as_deref(), Some("v"));
        let m = c.expect(r"boot (\d)", Duration::from_secs(1)).unwrap();
        assert_eq!(m.groups[1].as_deref(), Some("2"), "the first boot line was consumed");
    }

    #[test]
    fn expect_waits_for_output_from_another_thread() {
        let c = Arc::new(Console::new(None, DEFAULT_LIMIT).unwrap());
        c.set_live(true, "running");
        let w = c.clone();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            print(&w, "hel");
            thread::sleep(Duration::from_millis(20));
            print(&w, "lo world\n");
        });
        let m = c.expect("hello w", Duration::from_secs(5)).unwrap();
        assert_eq!(m.text, "hello w");
        t.join().unwrap();
    }

    #[test]
    fn timeout_and_end_carry_the_tail() {
        let c = Console::new(None, DEFAULT_LIMIT).unwrap();
        c.set_live(true, "running");
        print(&c, "last words\n");
        let t0 = Instant::now();
        let err = c.expect("never", Duration::from_millis(100)).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(1));
        assert!(matches!(err, Error::ConsoleTimeout { .. }));
        assert!(err.to_string().contains("last words"), "{err}");
        c.set_live(false, "halted");
        let err = c.expect("never", Duration::from_secs(60)).unwrap_err();
        assert!(matches!(err, Error::ConsoleEnded { .. }));
        assert!(err.to_string().contains("halted"), "{err}");
        assert!(matches!(c.expect("(", Duration::ZERO), Err(Error::Pattern { .. })));
        c.set_live(true, "running");
        let err = c.expect_while("never", Duration::MAX, || false).unwrap_err();
        assert!(matches!(err, Error::Interrupted));
    }

    #[test]
    fn read_from_streams_new_output() {
        let c = Arc::new(Console::new(None, DEFAULT_LIMIT).unwrap());
        c.set_live(true, "running");
        print(&c, "abc");
        assert_eq!(c.read_from(0, Duration::ZERO), (0, b"abc".to_vec()));
        assert_eq!(c.read_from(3, Duration::from_millis(20)), (3, Vec::new()));
        let w = c.clone();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            print(&w, "de");
        });
        assert_eq!(c.read_from(3, Duration::from_secs(5)), (3, b"de".to_vec()));
        t.join().unwrap();
        c.set_live(false, "halted");
        assert_eq!(c.read_from(5, Duration::from_secs(60)), (5, Vec::new()), "nothing more can come");
        assert!(!c.is_live());
    }

    #[test]
    fn long_output_keeps_every_byte_and_finds_late_matches() {
        let c = Console::new(None, DEFAULT_LIMIT).unwrap();
        c.set_live(true, "running");
        let line = "x".repeat(99) + "\n";
        for _ in 0..1000 {
            print(&c, &line);
        }
        print(&c, "MARKER\n");
        assert_eq!(c.output().len(), 100 * 1000 + 7);
        c.expect("MARKER", Duration::from_secs(1)).unwrap();
        assert!(c.tail().ends_with("MARKER\n"));
    }

    #[test]
    fn output_past_the_limit_drops_the_oldest_bytes_and_counts_them() {
        let c = Console::new(None, 1000).unwrap();
        c.set_live(true, "running");
        for i in 0..100 {
            print(&c, &format!("line {i:04} {}\n", "x".repeat(40)));
        }
        let (kept, dropped) = (c.output_bytes().len(), c.dropped());
        assert_eq!(kept + dropped, 100 * 51, "every byte is kept or counted");
        assert!((1000..=1125).contains(&kept), "kept {kept}");
        assert!(c.output().ends_with(&format!("line 0099 {}\n", "x".repeat(40))), "the newest are kept");
        // Offsets count the dropped bytes: a match is where it was printed.
        let m = c.expect(r"line 0098", Duration::ZERO).unwrap();
        assert_eq!(m.start, 98 * 51);
        assert!(c.expect(r"line 0001", Duration::ZERO).is_err(), "dropped output is not searched");
        // A reader behind the dropped bytes learns where its data starts.
        let (start, data) = c.read_from(0, Duration::ZERO);
        assert_eq!((start, data.len()), (dropped, kept));
    }

    #[test]
    fn tee_copies_to_a_file_and_send_needs_an_input() {
        let dir = std::env::temp_dir().join(format!("vmcore-tee-{}", std::process::id()));
        let c = Console::new(Some(&Tee::File(dir.clone())), DEFAULT_LIMIT).unwrap();
        print(&c, "to the file\n");
        assert_eq!(std::fs::read_to_string(&dir).unwrap(), "to the file\n");
        std::fs::remove_file(dir).unwrap();
        assert!(c.send(b"x").is_err());
    }
}
