//! Transmission windows (DESIGN §2 "Start time and overnight pre-load", FIG. 8): when a
//! scheduled title loops, and when a batch receiver may fetch. Sans-I/O: everything takes the
//! time as Unix seconds, so a test can run a "night" of a few seconds and a unit test can ask
//! about any date.
//!
//! A window is "HH:MM-HH:MM" or "HH:MM:SS-HH:MM:SS" in a fixed UTC offset ("UTC", "+02:00");
//! an end at or before the start crosses midnight, equal ends mean a whole day. `days` name
//! the days a window *opens* on (a Friday 23:00-01:00 window closes on Saturday). No tz
//! database: a fixed offset is explicit and cannot shift under the operator at a DST change.

use std::collections::BTreeMap;

const DAY: i64 = 86_400;

/// A daily time window in some fixed offset from UTC, on some days of the week.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// Opening time, seconds after local midnight.
    pub start: u32,
    /// Length in seconds (1 ..= 86400).
    pub len: u32,
    /// Local time = UTC + `offset` seconds.
    pub offset: i32,
    /// Bit d set: the window opens on weekday d (0 = Monday).
    pub days: u8,
}

/// Whether a window is open at some instant, and when that changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowState {
    /// Open until `until` (Unix seconds; back-to-back windows are merged).
    Open { until: i64 },
    /// Closed; opens at `opens` (`None`: never, no days selected).
    Closed { opens: Option<i64> },
}

impl WindowState {
    pub fn is_open(&self) -> bool {
        matches!(self, WindowState::Open { .. })
    }

    /// The next transition (close or open), if any.
    pub fn next_change(&self) -> Option<i64> {
        match *self {
            WindowState::Open { until } => Some(until),
            WindowState::Closed { opens } => opens,
        }
    }
}

pub const ALL_DAYS: u8 = 0x7f;
const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// "HH:MM" or "HH:MM:SS" (00:00:00 ..= 24:00:00) as seconds after midnight.
pub fn parse_time(s: &str) -> Result<u32, String> {
    let bad = || format!("{s:?}: expected HH:MM or HH:MM:SS");
    let parts: Vec<&str> = s.trim().split(':').collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(bad());
    }
    let mut v = [0u32; 3];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        v[i] = p.parse().map_err(|_| bad())?;
    }
    let t = v[0] * 3600 + v[1] * 60 + v[2];
    if v[1] > 59 || v[2] > 59 || t > DAY as u32 {
        return Err(format!("{s:?}: not a time of day"));
    }
    Ok(t)
}

/// "01:00-05:00" → (start, length) in seconds; an end at or before the start crosses midnight.
pub fn parse_span(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected START-END, e.g. 01:00-05:00"))?;
    let start = parse_time(a)? % DAY as u32;
    let end = parse_time(b)? % DAY as u32;
    let len = (end + DAY as u32 - start) % DAY as u32;
    Ok((start, if len == 0 { DAY as u32 } else { len }))
}

/// "UTC", "Z", "+02:00", "-05:30", "+0200" → seconds east of UTC.
pub fn parse_offset(s: &str) -> Result<i32, String> {
    let t = s.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("utc") || t == "Z" {
        return Ok(0);
    }
    let bad = || format!("{s:?}: expected UTC or a fixed offset like +02:00");
    let (sign, rest) = match t.as_bytes()[0] {
        b'+' => (1, &t[1..]),
        b'-' => (-1, &t[1..]),
        _ => return Err(bad()),
    };
    let digits: String = rest.chars().filter(|c| *c != ':').collect();
    if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let h: i32 = digits[..2].parse().map_err(|_| bad())?;
    let m: i32 = digits[2..].parse().map_err(|_| bad())?;
    if h > 14 || m > 59 {
        return Err(bad());
    }
    Ok(sign * (h * 3600 + m * 60))
}

/// Day names ("mon", "tue", …, "daily", "weekdays", "weekend", ranges "mon-fri"), as a mask.
/// An empty list means every day.
pub fn parse_days(list: &[String]) -> Result<u8, String> {
    if list.is_empty() {
        return Ok(ALL_DAYS);
    }
    let day = |n: &str| {
        let n = n.trim().to_ascii_lowercase();
        DAY_NAMES
            .iter()
            .position(|d| n.len() >= 3 && d.starts_with(&n[..3]) && d[..] == n[..3])
            .ok_or_else(|| format!("{n:?}: not a day (mon … sun, daily, weekdays, weekend)"))
    };
    let mut mask = 0u8;
    for item in list {
        let item = item.trim().to_ascii_lowercase();
        mask |= match item.as_str() {
            "daily" | "all" | "every" => ALL_DAYS,
            "weekdays" => 0x1f,
            "weekend" => 0x60,
            _ => match item.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (day(a)?, day(b)?);
                    let mut m = 0u8;
                    let mut d = a;
                    loop {
                        m |= 1 << d;
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                    m
                }
                None => 1 << day(&item)?,
            },
        };
    }
    Ok(mask)
}

impl Window {
    /// Parse the window text, its offset and its days.
    pub fn parse(span: &str, offset: &str, days: &[String]) -> Result<Window, String> {
        let (start, len) = parse_span(span)?;
        Ok(Window {
            start,
            len,
            offset: parse_offset(offset)?,
            days: parse_days(days)?,
        })
    }

    /// The occurrence that opens on local day `d` (days since 1970-01-01 local), if any.
    fn occurrence(&self, d: i64) -> Option<(i64, i64)> {
        // 1970-01-01 was a Thursday (weekday 3 with Monday = 0).
        let weekday = (d + 3).rem_euclid(7);
        if self.days & (1 << weekday) == 0 {
            return None;
        }
        let open = d * DAY + self.start as i64 - self.offset as i64;
        Some((open, open + self.len as i64))
    }

    /// Open or closed at `now` (Unix seconds), and until when.
    pub fn state_at(&self, now: i64) -> WindowState {
        let today = (now + self.offset as i64).div_euclid(DAY);
        // An occurrence that opened yesterday may still be open (windows crossing midnight).
        for d in [today - 1, today] {
            if let Some((open, mut close)) = self.occurrence(d) {
                if open <= now && now < close {
                    // Merge back-to-back occurrences (e.g. whole-day windows on several days).
                    let mut next = d + 1;
                    while let Some((o, c)) = self.occurrence(next) {
                        if o != close || next > d + 7 {
                            break;
                        }
                        close = c;
                        next += 1;
                    }
                    return WindowState::Open { until: close };
                }
            }
        }
        let opens = (today..=today + 8)
            .filter_map(|d| self.occurrence(d))
            .map(|(o, _)| o)
            .find(|o| *o > now);
        WindowState::Closed { opens }
    }
}

/// One `[[schedule]]` entry as the server runs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub titles: Vec<String>,
    pub window: Window,
    /// Loop rate cap for these titles while the window is open (bit/s; `None`: channel rate).
    pub rate_cap_bps: Option<u64>,
    /// Outside its windows the title is also served on demand (else joins are refused then).
    pub on_demand: bool,
}

/// What the server driver should do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Open (or re-cap) the title's loop, with no receivers needed.
    Open {
        title: String,
        rate_cap_bps: Option<u64>,
    },
    /// Close the title's loop, whatever receivers remain. `refuse`: turn joins away until the
    /// next window.
    Close { title: String, refuse: bool },
}

/// The server's schedule: turns the clock into open/close actions for each scheduled title.
#[derive(Debug, Default)]
pub struct Scheduler {
    plans: Vec<Plan>,
    /// Titles open now, with their cap.
    open: BTreeMap<String, Option<u64>>,
    /// Nothing changes before this (Unix seconds).
    next_check: i64,
}

impl Scheduler {
    pub fn new(plans: Vec<Plan>) -> Scheduler {
        Scheduler {
            plans,
            open: BTreeMap::new(),
            next_check: i64::MIN,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }

    /// Every title named in some plan.
    pub fn titles(&self) -> Vec<String> {
        let mut t: Vec<String> = self.plans.iter().flat_map(|p| p.titles.clone()).collect();
        t.sort();
        t.dedup();
        t
    }

    /// Whether `title` is looping on its schedule now.
    pub fn is_open(&self, title: &str) -> bool {
        self.open.contains_key(title)
    }

    /// Actions due at `now` (Unix seconds). Call on every turn; cheap between transitions.
    pub fn poll(&mut self, now: i64) -> Vec<Action> {
        if now < self.next_check {
            return Vec::new();
        }
        let mut want: BTreeMap<String, Option<u64>> = BTreeMap::new();
        let mut next = i64::MAX;
        for p in &self.plans {
            let st = p.window.state_at(now);
            if let Some(t) = st.next_change() {
                next = next.min(t);
            }
            if st.is_open() {
                for t in &p.titles {
                    let cap = want.entry(t.clone()).or_insert(p.rate_cap_bps);
                    // Several open plans for one title: the tightest cap wins.
                    *cap = match (*cap, p.rate_cap_bps) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
            }
        }
        self.next_check = next;
        let mut out = Vec::new();
        for (t, _) in self.open.iter().filter(|(t, _)| !want.contains_key(*t)) {
            let refuse = !self
                .plans
                .iter()
                .any(|p| p.on_demand && p.titles.contains(t));
            out.push(Action::Close {
                title: t.clone(),
                refuse,
            });
        }
        for (t, cap) in &want {
            if self.open.get(t) != Some(cap) {
                out.push(Action::Open {
                    title: t.clone(),
                    rate_cap_bps: *cap,
                });
            }
        }
        self.open = want;
        out
    }

    /// Titles that refuse joins at start-up (scheduled, not on demand): the driver marks them
    /// before its first poll opens the ones whose window is open.
    pub fn refused_outside(&self) -> Vec<String> {
        self.titles()
            .into_iter()
            .filter(|t| {
                !self
                    .plans
                    .iter()
                    .any(|p| p.on_demand && p.titles.contains(t))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-16 is a Monday; 00:00 UTC that day.
    const MON: i64 = 1_794_787_200;

    fn w(span: &str, off: &str, days: &[&str]) -> Window {
        let d: Vec<String> = days.iter().map(|s| s.to_string()).collect();
        Window::parse(span, off, &d).unwrap()
    }

    #[test]
    fn monday_constant_is_a_monday() {
        assert_eq!((MON / DAY + 3).rem_euclid(7), 0);
    }

    #[test]
    fn parses_times_spans_offsets_and_days() {
        assert_eq!(parse_time("01:00").unwrap(), 3600);
        assert_eq!(parse_time("23:59:59").unwrap(), 86_399);
        assert_eq!(parse_time("24:00").unwrap(), 86_400);
        for bad in [
            "1:00", "25:00", "01:60", "01:00:61", "aa:bb", "01", "24:00:01",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_span("01:00-05:00").unwrap(), (3600, 4 * 3600));
        assert_eq!(parse_span("23:00-01:00").unwrap(), (23 * 3600, 2 * 3600));
        assert_eq!(parse_span("05:00-05:00").unwrap(), (5 * 3600, 86_400));
        assert_eq!(parse_span("00:00-24:00").unwrap(), (0, 86_400));
        assert_eq!(parse_span("10:00:05-10:00:12").unwrap(), (36_005, 7));
        assert!(parse_span("01:00").is_err());
        assert_eq!(parse_offset("UTC").unwrap(), 0);
        assert_eq!(parse_offset("+02:00").unwrap(), 7200);
        assert_eq!(parse_offset("-0530").unwrap(), -19_800);
        for bad in ["CET", "+2", "+25:00", "02:00"] {
            assert!(parse_offset(bad).is_err(), "{bad}");
        }
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_days(&[]).unwrap(), ALL_DAYS);
        assert_eq!(parse_days(&s(&["mon-fri"])).unwrap(), 0x1f);
        assert_eq!(parse_days(&s(&["sat", "Sunday"])).unwrap(), 0x60);
        assert_eq!(parse_days(&s(&["fri-mon"])).unwrap(), 0x71);
        assert!(parse_days(&s(&["funday"])).is_err());
    }

    #[test]
    fn plain_window_opens_and_closes() {
        let win = w("01:00-05:00", "UTC", &[]);
        assert_eq!(
            win.state_at(MON),
            WindowState::Closed {
                opens: Some(MON + 3600)
            }
        );
        assert_eq!(
            win.state_at(MON + 3600),
            WindowState::Open {
                until: MON + 5 * 3600
            }
        );
        assert_eq!(
            win.state_at(MON + 5 * 3600 - 1),
            WindowState::Open {
                until: MON + 5 * 3600
            }
        );
        assert_eq!(
            win.state_at(MON + 5 * 3600),
            WindowState::Closed {
                opens: Some(MON + DAY + 3600)
            }
        );
    }

    #[test]
    fn window_crossing_midnight_with_offset() {
        // 23:00-01:00 at +02:00 = 21:00-23:00 UTC.
        let win = w("23:00-01:00", "+02:00", &[]);
        let open = MON + 21 * 3600;
        assert!(!win.state_at(open - 1).is_open());
        assert_eq!(win.state_at(open), WindowState::Open { until: open + 7200 });
        // Local midnight passed: still the same (Monday's) occurrence.
        assert_eq!(
            win.state_at(open + 3600),
            WindowState::Open { until: open + 7200 }
        );
        assert_eq!(
            win.state_at(open + 7200),
            WindowState::Closed {
                opens: Some(open + DAY)
            }
        );
        // A negative offset: 01:00-05:00 at -05:00 = 06:00-10:00 UTC.
        let west = w("01:00-05:00", "-05:00", &[]);
        assert_eq!(
            west.state_at(MON + 7 * 3600),
            WindowState::Open {
                until: MON + 10 * 3600
            }
        );
    }

    #[test]
    fn days_select_the_opening_day() {
        // Fridays only, crossing midnight: open Friday 23:00 until Saturday 01:00.
        let win = w("23:00-01:00", "UTC", &["fri"]);
        let fri = MON + 4 * DAY;
        assert_eq!(
            win.state_at(MON),
            WindowState::Closed {
                opens: Some(fri + 23 * 3600)
            }
        );
        assert_eq!(
            win.state_at(fri + DAY + 1800),
            WindowState::Open {
                until: fri + DAY + 3600
            }
        );
        // After it, the next one is a week later.
        assert_eq!(
            win.state_at(fri + DAY + 3600),
            WindowState::Closed {
                opens: Some(fri + 7 * DAY + 23 * 3600)
            }
        );
        // Weekdays: Saturday morning waits for Monday.
        let wd = w("01:00-05:00", "UTC", &["weekdays"]);
        assert_eq!(
            wd.state_at(fri + DAY + 2 * 3600),
            WindowState::Closed {
                opens: Some(MON + 7 * DAY + 3600)
            }
        );
        // Whole days back to back merge into one open stretch.
        let all = w("00:00-24:00", "UTC", &["mon-wed"]);
        assert_eq!(
            all.state_at(MON + 10),
            WindowState::Open {
                until: MON + 3 * DAY
            }
        );
        let none = Window {
            days: 0,
            ..all.clone()
        };
        assert_eq!(none.state_at(MON), WindowState::Closed { opens: None });
    }

    #[test]
    fn scheduler_opens_and_closes_titles() {
        let plan = |span: &str, titles: &[&str], cap: Option<u64>, on_demand: bool| Plan {
            titles: titles.iter().map(|s| s.to_string()).collect(),
            window: w(span, "UTC", &[]),
            rate_cap_bps: cap,
            on_demand,
        };
        let mut s = Scheduler::new(vec![
            plan("01:00-05:00", &["a", "b"], Some(10_000_000), false),
            plan("02:00-03:00", &["b"], Some(5_000_000), true),
        ]);
        assert_eq!(s.refused_outside(), vec!["a".to_string()]);
        assert!(s.poll(MON).is_empty());
        let open_a = |cap| Action::Open {
            title: "a".into(),
            rate_cap_bps: Some(cap),
        };
        let open_b = |cap| Action::Open {
            title: "b".into(),
            rate_cap_bps: Some(cap),
        };
        assert_eq!(
            s.poll(MON + 3600),
            vec![open_a(10_000_000), open_b(10_000_000)]
        );
        assert!(s.poll(MON + 3601).is_empty());
        assert!(s.is_open("a"));
        // The tighter plan re-caps b for its hour, then b goes back to the wider cap.
        assert_eq!(s.poll(MON + 2 * 3600), vec![open_b(5_000_000)]);
        assert_eq!(s.poll(MON + 3 * 3600), vec![open_b(10_000_000)]);
        // At 05:00 both close; b is on demand outside its windows (via the second plan).
        assert_eq!(
            s.poll(MON + 5 * 3600),
            vec![
                Action::Close {
                    title: "a".into(),
                    refuse: true
                },
                Action::Close {
                    title: "b".into(),
                    refuse: false
                }
            ]
        );
        assert!(!s.is_open("a"));
        assert!(s.poll(MON + 6 * 3600).is_empty());
    }
}
