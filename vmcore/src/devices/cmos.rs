//! The PC's CMOS: an MC146818 real-time clock with 128 bytes of NVRAM, at ports 0x70
//! (index, bit 7 masks NMI) and 0x71 (data). The clock reads the host's time (UTC) in the
//! format status register B asks for (BCD or binary, 12 or 24 hours); the NVRAM carries the
//! memory sizes and CPU count firmware leaves there.

use std::time::{SystemTime, UNIX_EPOCH};

use super::PortDevice;
use crate::outcome::Outcome;

pub const CMOS_PORT: u16 = 0x70;

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const STATUS_A: usize = 0x0A;
const STATUS_B: usize = 0x0B;
const STATUS_C: usize = 0x0C;
const STATUS_D: usize = 0x0D;
const CENTURY: usize = 0x32;

const B_24_HOUR: u8 = 1 << 1;
const B_BINARY: u8 = 1 << 2;

/// A calendar time (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    pub year: u32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 1 = Sunday, as the RTC counts.
    pub weekday: u32,
}

impl DateTime {
    /// The calendar date of a Unix time (proleptic Gregorian, UTC).
    pub fn from_unix(seconds: u64) -> DateTime {
        let days = (seconds / 86_400) as i64;
        let secs = seconds % 86_400;
        // Days since 0000-03-01, in 400-year eras (Howard Hinnant's civil-from-days).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
        DateTime {
            year,
            month,
            day,
            hour: (secs / 3600) as u32,
            minute: (secs / 60 % 60) as u32,
            second: (secs % 60) as u32,
            weekday: ((days + 4).rem_euclid(7) + 1) as u32, // 1970-01-01 was a Thursday
        }
    }
}

/// Where the CMOS gets the time; tests pin it.
pub type Clock = Box<dyn Fn() -> DateTime + Send>;

pub fn host_clock() -> Clock {
    Box::new(|| DateTime::from_unix(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())))
}

pub struct Cmos {
    index: usize,
    nvram: [u8; 128],
    clock: Clock,
}

impl Cmos {
    /// A CMOS for a machine with `ram_below_4g` and `ram_above_4g` bytes of RAM and `cpus`
    /// processors.
    pub fn new(ram_below_4g: u64, ram_above_4g: u64, cpus: usize, clock: Clock) -> Cmos {
        let mut nvram = [0u8; 128];
        nvram[STATUS_A] = 0x26; // 32.768 kHz time base, 1.024 kHz rate, no update in progress
        nvram[STATUS_B] = B_24_HOUR; // BCD, 24-hour, no interrupts
        nvram[STATUS_D] = 0x80; // valid RAM and time
        let mut put16 = |at: usize, v: u64| {
            let v = v.min(0xFFFF) as u16;
            nvram[at] = v as u8;
            nvram[at + 1] = (v >> 8) as u8;
        };
        put16(0x15, 640); // base memory, KiB
        let extended_kib = ram_below_4g.saturating_sub(1 << 20) / 1024;
        put16(0x17, extended_kib);
        put16(0x30, extended_kib);
        put16(0x34, ram_below_4g.saturating_sub(16 << 20) / 65_536); // above 16 MiB, 64 KiB units
        let high = ram_above_4g / 65_536;
        nvram[0x5B] = high as u8;
        nvram[0x5C] = (high >> 8) as u8;
        nvram[0x5D] = (high >> 16) as u8;
        nvram[0x5F] = cpus.saturating_sub(1).min(255) as u8;
        Cmos { index: 0, nvram, clock }
    }

    fn encode(&self, value: u32) -> u8 {
        if self.nvram[STATUS_B] & B_BINARY != 0 {
            value as u8
        } else {
            (((value / 10) << 4) | (value % 10)) as u8
        }
    }

    fn read_register(&self, index: usize) -> u8 {
        let t = || (self.clock)();
        match index {
            SECONDS => self.encode(t().second),
            MINUTES => self.encode(t().minute),
            HOURS => {
                let hour = t().hour;
                if self.nvram[STATUS_B] & B_24_HOUR != 0 {
                    self.encode(hour)
                } else {
                    let pm = if hour >= 12 { 0x80 } else { 0 };
                    let h12 = match hour % 12 {
                        0 => 12,
                        h => h,
                    };
                    self.encode(h12) | pm
                }
            }
            WEEKDAY => self.encode(t().weekday),
            DAY => self.encode(t().day),
            MONTH => self.encode(t().month),
            YEAR => self.encode(t().year % 100),
            CENTURY => self.encode(t().year / 100),
            // Reading status C clears the interrupt flags (none are ever raised here).
            STATUS_C => 0,
            other => self.nvram[other],
        }
    }
}

impl PortDevice for Cmos {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(if offset == 1 { self.read_register(self.index) } else { 0xFF });
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<Outcome> {
        let value = data[0];
        match offset {
            0 => self.index = usize::from(value & 0x7F),
            // The clock follows the host; writes to it (and to the read-only status C/D) are
            // dropped, the rest is NVRAM.
            _ => match self.index {
                SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY | STATUS_C | STATUS_D => {}
                STATUS_A => self.nvram[STATUS_A] = value & 0x7F,
                other => self.nvram[other] = value,
            },
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pinned() -> Clock {
        // 2026-11-24 19:02:48 UTC, a Tuesday.
        Box::new(|| DateTime::from_unix(1_795_546_968))
    }

    fn read(cmos: &mut Cmos, index: u8) -> u8 {
        cmos.write(0, &[index]);
        let mut b = [0u8];
        cmos.read(1, &mut b);
        b[0]
    }

    #[test]
    fn unix_time_becomes_a_calendar_date() {
        let t = DateTime::from_unix(1_795_546_968);
        assert_eq!((t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday), (2026, 11, 24, 19, 2, 48, 3));
        assert_eq!(DateTime::from_unix(0).weekday, 5, "1970-01-01 was a Thursday");
        let leap = DateTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
    }

    #[test]
    fn clock_reads_in_bcd_then_binary_and_12_hour() {
        let mut cmos = Cmos::new(64 << 20, 0, 2, pinned());
        assert_eq!(read(&mut cmos, 0x00), 0x48);
        assert_eq!(read(&mut cmos, 0x04), 0x19);
        assert_eq!(read(&mut cmos, 0x09), 0x26);
        assert_eq!(read(&mut cmos, 0x32), 0x20);
        assert_eq!(read(&mut cmos, 0x0A) & 0x80, 0, "no update in progress");
        cmos.write(0, &[0x0B]);
        cmos.write(1, &[B_BINARY]); // binary, 12-hour
        assert_eq!(read(&mut cmos, 0x00), 48);
        assert_eq!(read(&mut cmos, 0x04), 0x80 | 7, "7 pm");
        cmos.write(0, &[0x08 | 0x80]); // the NMI-mask bit does not change the index
        let mut b = [0u8];
        cmos.read(1, &mut b);
        assert_eq!(b[0], 11);
    }

    #[test]
    fn nvram_holds_memory_sizes_and_keeps_writes() {
        let mut cmos = Cmos::new(3 << 30, 1 << 30, 4, pinned());
        let word = |c: &mut Cmos, at: u8| u16::from(read(c, at)) | u16::from(read(c, at + 1)) << 8;
        assert_eq!(word(&mut cmos, 0x15), 640);
        assert_eq!(word(&mut cmos, 0x17), 0xFFFF, "capped");
        assert_eq!(word(&mut cmos, 0x34), (((3u64 << 30) - (16 << 20)) / 65_536) as u16);
        assert_eq!(read(&mut cmos, 0x5C), 0x40, "1 GiB above 4 GiB is 0x4000 64 KiB units");
        assert_eq!(read(&mut cmos, 0x5F), 3);
        cmos.write(0, &[0x40]);
        cmos.write(1, &[0xAB]);
        assert_eq!(read(&mut cmos, 0x40), 0xAB);
        cmos.write(0, &[0x00]);
        cmos.write(1, &[0x59]);
        assert_eq!(read(&mut cmos, 0x00), 0x48, "the clock is the host's");
    }
}
