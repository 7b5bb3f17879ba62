//! Renders a [`BenchRun`] for people: a markdown document (the run's context, two
//! tables per link profile, the goals checked against the figures) and a
//! standalone SVG chart of the median time to ready.
//!
//! Invariants: rendering never panics and never prints NaN or infinity, whatever
//! the run holds (no samples, missing modes or profiles, zero sizes or durations):
//! a figure that cannot be computed is left blank. Text that came from the run
//! (workload names, commands, the machine) is escaped for where it lands: markdown
//! cells, code spans and fences, XML text and attributes. Goal verdicts compare
//! exact integers (nanoseconds, bytes), so a figure printed as "5.0×" is never
//! judged against a rounded value.

use std::fmt::Write as _;
use std::time::Duration;

use super::results::{BenchRun, Mode, ProfileInfo, Summary, WorkloadInfo};

/// The profile at which the lazy modes must beat full by [`speedup_goal`] and a
/// profiled start stay within [`LOWER_BOUND_GOAL`] of the lower bound.
const GOAL_PROFILE_FAST: &str = "region";
/// The profile at which no lazy mode may be slower than full, and the
/// unprofiled one must be [`SLOW_LINK_SPEEDUP_GOAL`]× faster.
const GOAL_PROFILE_SLOW: &str = "wan";
/// An unprofiled start (lazy (skopeo), else lazy) ≥ this × faster than full at
/// [`GOAL_PROFILE_SLOW`].
const SLOW_LINK_SPEEDUP_GOAL: u128 = 3;
/// A profiled start (lazy+profile) total ≤ num/den × the lower bound at
/// [`GOAL_PROFILE_FAST`].
const LOWER_BOUND_GOAL: (u128, u128) = (13, 10);
/// warm (zest) total ≤ num/den × warm (overlayfs) total.
const WARM_GOAL: (u128, u128) = (11, 10);
/// Bytes fetched by an unprofiled lazy mode ≤ this × the start-up working set.
const WORKING_SET_GOAL: u128 = 2;

/// How many times faster than full an unprofiled start must be at
/// [`GOAL_PROFILE_FAST`]: 8×, except 5× for postgres, whose start writes a
/// database and runs a server (the goal as the project set it).
fn speedup_goal(workload: &str) -> u128 {
    if workload.starts_with("postgres") {
        5
    } else {
        8
    }
}

/// The unprofiled lazy mode the goals judge: the third-party image when it
/// was measured, else zest's own conversion.
const UNPROFILED: [Mode; 2] = [Mode::ThirdParty, Mode::Lazy];

/// The run as a markdown document: a header (command, machine, version, start,
/// profiles, workloads), a times table and a transfer table per profile, and the
/// goals checked against the medians.
pub fn markdown(run: &BenchRun) -> String {
    let view = View::new(run);
    let mut out = String::new();
    view.header(&mut out);
    if view.rows.is_empty() {
        out.push_str("No samples were recorded in this run.\n");
        return out;
    }
    view.legend(&mut out);
    for profile in &view.profiles {
        view.profile_tables(&mut out, profile);
    }
    view.goals_section(&mut out);
    out
}

/// The run as a standalone SVG chart: one panel per profile (each with its own
/// linear time axis, since a `wan` full pull and a `lan` lazy start differ by
/// 100×), one group of horizontal bars per workload, one bar per mode with its
/// median total time written beside it, p95 as a whisker and the lower bound as a
/// dashed line across the group. No external fonts, styles or scripts.
pub fn svg(run: &BenchRun) -> String {
    Chart::new(&View::new(run)).render()
}

/// The run with its summaries computed once and its workloads and profiles in
/// report order: the order of [`RunInfo`](super::results::RunInfo), then any that
/// only the samples name.
struct View<'a> {
    run: &'a BenchRun,
    /// Summaries ordered by workload, profile, then mode.
    rows: Vec<Summary>,
    /// Workloads that have at least one summary, in report order.
    workloads: Vec<String>,
    /// Profiles that have at least one summary, in report order.
    profiles: Vec<String>,
}

impl<'a> View<'a> {
    fn new(run: &'a BenchRun) -> Self {
        let mut rows = run.summaries();
        let order = |declared: Vec<&str>, named: Vec<&str>| -> Vec<String> {
            let mut out: Vec<String> = Vec::new();
            for name in declared.into_iter().chain(named.iter().copied()) {
                if named.contains(&name) && !out.iter().any(|o| o == name) {
                    out.push(name.to_string());
                }
            }
            out
        };
        let workloads = order(
            run.info.workloads.iter().map(|w| w.name.as_str()).collect(),
            rows.iter().map(|r| r.workload.as_str()).collect(),
        );
        let profiles = order(
            run.info.profiles.iter().map(|p| p.name.as_str()).collect(),
            rows.iter().map(|r| r.profile.as_str()).collect(),
        );
        let position = |list: &[String], name: &str| list.iter().position(|n| n == name);
        rows.sort_by_key(|r| {
            (
                position(&workloads, &r.workload),
                position(&profiles, &r.profile),
                r.mode,
            )
        });
        View {
            run,
            rows,
            workloads,
            profiles,
        }
    }

    fn get(&self, workload: &str, profile: &str, mode: Mode) -> Option<&Summary> {
        self.rows
            .iter()
            .find(|r| r.workload == workload && r.profile == profile && r.mode == mode)
    }

    fn workload_info(&self, name: &str) -> Option<&WorkloadInfo> {
        self.run.info.workloads.iter().find(|w| w.name == name)
    }

    fn profile_info(&self, name: &str) -> Option<&ProfileInfo> {
        self.run.info.profiles.iter().find(|p| p.name == name)
    }

    /// The lower bound shown beside a row: cold rows only.
    fn lower_bound(&self, row: &Summary) -> Option<Duration> {
        if row.mode.is_cold() {
            self.run.lower_bound(&row.workload, &row.profile)
        } else {
            None
        }
    }

    /// "20 ms RTT, 200 Mbit/s" for a profile, or "" when the run does not describe it.
    fn profile_link(&self, name: &str) -> String {
        self.profile_info(name)
            .map(|p| format!("{} RTT, {}", fmt_rtt(p.rtt), fmt_bandwidth(p.bandwidth_bps)))
            .unwrap_or_default()
    }

    fn header(&self, out: &mut String) {
        let info = &self.run.info;
        out.push_str("## Cold start benchmark\n\n");
        if info.command.trim().is_empty() {
            out.push_str("The command that produced this run was not recorded.\n\n");
        } else {
            let _ = writeln!(
                out,
                "Produced by (rerun it to check):\n\n{}",
                md_fence(&info.command, "sh")
            );
        }
        let field = |v: &str| {
            if v.trim().is_empty() {
                "not recorded".to_string()
            } else {
                md_text(v)
            }
        };
        let _ = writeln!(out, "- Machine: {}", field(&info.machine));
        let _ = writeln!(out, "- zest: {}", field(&info.zest_version));
        let _ = writeln!(out, "- Build: {}", field(&info.build));
        if !info.node_filesystem.is_empty() {
            let _ = writeln!(out, "- Nodes' state on: {}", info.node_filesystem);
        }
        let _ = writeln!(
            out,
            "- Load (/proc/loadavg): {} at the start, {} at the end",
            field(&info.load_start),
            field(&info.load_end)
        );
        let _ = writeln!(out, "- Started: {}", field(&info.started));
        let _ = writeln!(out, "- Samples: {}\n", self.run.samples.len());

        if !info.profiles.is_empty() {
            out.push_str("| link profile | added RTT | bandwidth |\n|---|---:|---:|\n");
            for p in &info.profiles {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} |",
                    md_text(&p.name),
                    fmt_rtt(p.rtt),
                    fmt_bandwidth(p.bandwidth_bps)
                );
            }
            out.push('\n');
        }
        if !info.workloads.is_empty() {
            out.push_str(
                "| workload | command | ready when the output has | gzip image | \
                 zstd:chunked image | skopeo image | start-up working set |\n\
                 |---|---|---|---:|---:|---:|---:|\n",
            );
            for w in &info.workloads {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    md_text(&w.name),
                    md_code(&shell_join(&w.command), true),
                    md_code(&w.ready, true),
                    fmt_bytes(w.gzip_bytes),
                    fmt_bytes(w.chunked_bytes),
                    match &w.third_party_format {
                        Some(f) => format!("{} ({})", fmt_bytes(w.third_party_bytes), md_text(f)),
                        None => String::new(),
                    },
                    w.working_set_bytes.map(fmt_bytes).unwrap_or_default(),
                );
            }
            out.push('\n');
        }
    }

    /// How to read the tables, once for all profiles.
    fn legend(&self, out: &mut String) {
        out.push_str(
            "Times are medians over the samples of each row (p95 where noted); total is \
             pull plus run to ready. Speed-up is full's median total divided by the \
             row's; for warm (zest) it is warm (overlayfs) divided by warm (zest). The \
             lower bound is set-up round trips × RTT + start-up working set ÷ \
             bandwidth + the warm (overlayfs) run. Fetched bytes are counted at the \
             link (headers included) and compared with the gzip image for overlayfs \
             rows, the skopeo image for lazy (skopeo) and the zstd:chunked image for \
             the other zest rows. Blank: not applicable or \
             not measured.\n\n",
        );
    }

    fn profile_tables(&self, out: &mut String, profile: &str) {
        let link = self.profile_link(profile);
        if link.is_empty() {
            let _ = writeln!(out, "### {}\n", md_code(profile, false));
        } else {
            let _ = writeln!(out, "### {}: {link}\n", md_code(profile, false));
        }
        let rows: Vec<&Summary> = self.rows.iter().filter(|r| r.profile == profile).collect();

        out.push_str(
            "| workload | mode | samples | pull | run to ready | total | total p95 | \
             speed-up vs full | lower bound | total ÷ lower bound |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for r in &rows {
            let lower = self.lower_bound(r);
            let pull = if r.mode.is_cold() || !r.pull.median.is_zero() {
                fmt_time(r.pull.median)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                md_text(&r.workload),
                r.mode.label(),
                r.samples,
                pull,
                fmt_time(r.run.median),
                fmt_time(r.total.median),
                fmt_time(r.total.p95),
                self.speedup_cell(r),
                lower.map(fmt_time).unwrap_or_default(),
                lower
                    .and_then(|lb| dur_ratio(r.total.median, lb))
                    .map(fmt_factor)
                    .unwrap_or_default(),
            );
        }
        out.push('\n');

        out.push_str(
            "| workload | mode | fetched | fetched ÷ image | fetched ÷ working set | \
             registry requests | blocking misses | snapshotter CPU |\n\
             |---|---|---:|---:|---:|---:|---:|---:|\n",
        );
        for r in &rows {
            let info = self.workload_info(&r.workload);
            let image = info.map(|w| match r.mode {
                Mode::Full | Mode::WarmFull => w.gzip_bytes,
                Mode::Lazy | Mode::LazyProfile | Mode::WarmLazy => w.chunked_bytes,
                Mode::ThirdParty | Mode::Learned => w.third_party_bytes,
            });
            let of_image = image
                .and_then(|size| ratio(r.fetched_bytes as f64, size as f64))
                .map(fmt_percent)
                .unwrap_or_default();
            let of_working_set = match r.mode {
                Mode::Lazy | Mode::LazyProfile | Mode::ThirdParty | Mode::Learned => info
                    .and_then(|w| w.working_set_bytes)
                    .and_then(|ws| ratio(r.fetched_bytes as f64, ws as f64))
                    .map(fmt_factor)
                    .unwrap_or_default(),
                _ => String::new(),
            };
            // Blocking misses are counted by zest's FUSE layer; overlayfs has none.
            let misses = match r.mode {
                Mode::Full | Mode::WarmFull => String::new(),
                _ => r.blocking_misses.to_string(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                md_text(&r.workload),
                r.mode.label(),
                fmt_bytes(r.fetched_bytes),
                of_image,
                of_working_set,
                r.requests,
                misses,
                fmt_time(r.snapshotter_cpu),
            );
        }
        out.push('\n');
    }

    fn speedup_cell(&self, r: &Summary) -> String {
        let against = |mode| self.get(&r.workload, &r.profile, mode);
        match r.mode {
            Mode::Lazy | Mode::LazyProfile | Mode::ThirdParty | Mode::Learned => {
                against(Mode::Full)
                    .and_then(|full| dur_ratio(full.total.median, r.total.median))
                    .map(fmt_speedup)
                    .unwrap_or_default()
            }
            Mode::WarmLazy => against(Mode::WarmFull)
                .and_then(|warm| dur_ratio(warm.total.median, r.total.median))
                .map(|x| format!("{} vs warm (overlayfs)", fmt_speedup(x)))
                .unwrap_or_default(),
            Mode::Full | Mode::WarmFull => String::new(),
        }
    }

    fn goals_section(&self, out: &mut String) {
        out.push_str("### Goals\n\n");
        let goals = self.goals();
        if goals.is_empty() {
            out.push_str("This run has no data to check a goal against.\n");
            return;
        }
        out.push_str("Checked against the medians above.\n\n");
        for goal in goals {
            let _ = writeln!(out, "- **{}**", goal.title);
            for check in goal.checks {
                let verdict = if check.met { "met" } else { "**missed**" };
                let _ = writeln!(
                    out,
                    "  - {}: {verdict}: {}",
                    md_text(&check.workload),
                    check.figures
                );
            }
        }
    }

    /// Every goal with at least one check the data allow, in the order (a)–(e).
    fn goals(&self) -> Vec<Goal> {
        let fast = md_code(GOAL_PROFILE_FAST, false);
        let slow = md_code(GOAL_PROFILE_SLOW, false);
        let mut goals = vec![
            Goal::new(format!(
                "(a) an unprofiled start (lazy (skopeo), else lazy) at least 8× faster than \
                 full at {fast} (5× for postgres)"
            )),
            Goal::new(format!(
                "(b) a profiled start (lazy+learned, else lazy+profile) within {}× the lower \
                 bound at {fast}",
                fmt_fraction(LOWER_BOUND_GOAL)
            )),
            Goal::new(format!(
                "(c) no lazy mode slower than full at {slow}, and the unprofiled start at \
                 least {SLOW_LINK_SPEEDUP_GOAL}× faster"
            )),
            Goal::new(format!(
                "(d) warm (zest) within {}× warm (overlayfs), slowest profile shown",
                fmt_fraction(WARM_GOAL)
            )),
            Goal::new(format!(
                "(e) bytes fetched by the unprofiled start within {WORKING_SET_GOAL}× the \
                 start-up working set, largest profile shown"
            )),
        ];
        for w in &self.workloads {
            let name = w.as_str();
            if let Some(c) = self.check_speedup(name) {
                goals[0].checks.push(c);
            }
            if let Some(c) = self.check_lower_bound(name) {
                goals[1].checks.push(c);
            }
            if let Some(c) = self.check_wan(name) {
                goals[2].checks.push(c);
            }
            if let Some(c) = self.check_warm(name) {
                goals[3].checks.push(c);
            }
            if let Some(c) = self.check_working_set(name) {
                goals[4].checks.push(c);
            }
        }
        goals.retain(|g| !g.checks.is_empty());
        goals
    }

    /// The unprofiled mode measured for `w` at `profile`, if any.
    fn unprofiled(&self, w: &str, profile: &str) -> Option<(Mode, &Summary)> {
        UNPROFILED
            .into_iter()
            .find_map(|m| Some((m, self.get(w, profile, m)?)))
    }

    /// (a) the unprofiled start ≥ 8× (postgres 5×) faster than full at `region`.
    fn check_speedup(&self, w: &str) -> Option<Check> {
        let full = self.get(w, GOAL_PROFILE_FAST, Mode::Full)?.total.median;
        let (mode, lazy) = self.unprofiled(w, GOAL_PROFILE_FAST)?;
        let lazy = lazy.total.median;
        let goal = speedup_goal(w);
        Some(Check {
            workload: w.to_string(),
            met: full.as_nanos() >= goal * lazy.as_nanos(),
            figures: format!(
                "{} faster, goal {goal}× (full {}, {mode} {})",
                dur_ratio(full, lazy)
                    .map(fmt_speedup)
                    .unwrap_or_else(|| "immeasurably".into()),
                fmt_time(full),
                fmt_time(lazy)
            ),
        })
    }

    /// (b) lazy+learned (else lazy+profile) ≤ 1.3× the lower bound at `region`.
    fn check_lower_bound(&self, w: &str) -> Option<Check> {
        let (mode, lazy) = [Mode::Learned, Mode::LazyProfile]
            .into_iter()
            .find_map(|m| Some((m, self.get(w, GOAL_PROFILE_FAST, m)?)))?;
        let lazy = lazy.total.median;
        let bound = self.run.lower_bound(w, GOAL_PROFILE_FAST)?;
        let (num, den) = LOWER_BOUND_GOAL;
        Some(Check {
            workload: w.to_string(),
            met: den * lazy.as_nanos() <= num * bound.as_nanos(),
            figures: format!(
                "{} the lower bound ({mode} {}, lower bound {})",
                dur_ratio(lazy, bound)
                    .map(fmt_factor)
                    .unwrap_or_else(|| "unbounded ×".into()),
                fmt_time(lazy),
                fmt_time(bound)
            ),
        })
    }

    /// (c) at `wan`, no lazy mode slower than full, the unprofiled one ≥ 3× faster.
    fn check_wan(&self, w: &str) -> Option<Check> {
        let full = self.get(w, GOAL_PROFILE_SLOW, Mode::Full)?.total.median;
        let lazies: Vec<(Mode, Duration)> = [
            Mode::Lazy,
            Mode::ThirdParty,
            Mode::LazyProfile,
            Mode::Learned,
        ]
        .into_iter()
        .filter_map(|m| Some((m, self.get(w, GOAL_PROFILE_SLOW, m)?.total.median)))
        .collect();
        if lazies.is_empty() {
            return None;
        }
        let mut figures = format!("full {}", fmt_time(full));
        for (mode, t) in &lazies {
            let _ = write!(figures, ", {mode} {}", fmt_time(*t));
            let versus = if *t <= full {
                dur_ratio(full, *t).map(|x| format!("{} faster", fmt_speedup(x)))
            } else {
                dur_ratio(*t, full).map(|x| format!("{} slower", fmt_speedup(x)))
            };
            if let Some(v) = versus {
                let _ = write!(figures, " ({v})");
            }
        }
        let unprofiled_fast = self.unprofiled(w, GOAL_PROFILE_SLOW).is_none_or(|(_, s)| {
            full.as_nanos() >= SLOW_LINK_SPEEDUP_GOAL * s.total.median.as_nanos()
        });
        Some(Check {
            workload: w.to_string(),
            met: lazies.iter().all(|(_, t)| *t <= full) && unprofiled_fast,
            figures,
        })
    }

    /// (d) warm (zest) ≤ 1.1× warm (overlayfs), at every profile; the worst shown.
    fn check_warm(&self, w: &str) -> Option<Check> {
        let pairs: Vec<(&str, Duration, Duration)> = self
            .profiles
            .iter()
            .filter_map(|p| {
                let zest = self.get(w, p, Mode::WarmLazy)?.total.median;
                let overlay = self.get(w, p, Mode::WarmFull)?.total.median;
                Some((p.as_str(), zest, overlay))
            })
            .collect();
        // The largest zest/overlayfs ratio, compared by cross-multiplying so a zero
        // overlayfs time ranks as the worst rather than dividing by it.
        // On a tie the first profile in report order is shown (hence `rev`).
        let &(profile, zest, overlay) = pairs.iter().rev().max_by(|a, b| {
            let lhs = a.1.as_nanos().saturating_mul(b.2.as_nanos());
            lhs.cmp(&b.1.as_nanos().saturating_mul(a.2.as_nanos()))
        })?;
        let (num, den) = WARM_GOAL;
        Some(Check {
            workload: w.to_string(),
            met: pairs
                .iter()
                .all(|(_, z, o)| den * z.as_nanos() <= num * o.as_nanos()),
            figures: format!(
                "{}at {} (warm (zest) {}, warm (overlayfs) {}{})",
                dur_ratio(zest, overlay)
                    .map(|x| format!("{} ", fmt_factor(x)))
                    .unwrap_or_default(),
                md_code(profile, false),
                fmt_time(zest),
                fmt_time(overlay),
                of_profiles(pairs.len())
            ),
        })
    }

    /// (e) bytes fetched by the unprofiled start ≤ 2× the working set, at every
    /// profile; the largest shown.
    fn check_working_set(&self, w: &str) -> Option<Check> {
        let ws = self.workload_info(w)?.working_set_bytes?;
        let mode = UNPROFILED
            .into_iter()
            .find(|m| self.rows.iter().any(|r| r.workload == w && r.mode == *m))?;
        let fetched: Vec<(&str, u64)> = self
            .profiles
            .iter()
            .filter_map(|p| Some((p.as_str(), self.get(w, p, mode)?.fetched_bytes)))
            .collect();
        let &(profile, most) = fetched.iter().rev().max_by_key(|(_, b)| *b)?;
        Some(Check {
            workload: format!("{w} ({mode})"),
            met: fetched
                .iter()
                .all(|(_, b)| u128::from(*b) <= WORKING_SET_GOAL * u128::from(ws)),
            figures: format!(
                "{}at {} ({} fetched, working set {}{})",
                ratio(most as f64, ws as f64)
                    .map(|x| format!("{} the working set ", fmt_factor(x)))
                    .unwrap_or_default(),
                md_code(profile, false),
                fmt_bytes(most),
                fmt_bytes(ws),
                of_profiles(fetched.len())
            ),
        })
    }
}

/// "; worst of 3 profiles" when more than one profile was compared.
fn of_profiles(n: usize) -> String {
    if n > 1 {
        format!("; worst of {n} profiles")
    } else {
        String::new()
    }
}

/// A goal and its per-workload checks.
struct Goal {
    title: String,
    checks: Vec<Check>,
}

impl Goal {
    fn new(title: String) -> Self {
        Goal {
            title,
            checks: Vec::new(),
        }
    }
}

/// One workload's verdict on a goal, with the figures behind it (markdown).
struct Check {
    workload: String,
    met: bool,
    figures: String,
}

// ---------------------------------------------------------------------------
// Figures.

/// `a / b` when it is a finite number.
fn ratio(a: f64, b: f64) -> Option<f64> {
    let r = a / b;
    (b > 0.0 && r.is_finite()).then_some(r)
}

fn dur_ratio(a: Duration, b: Duration) -> Option<f64> {
    ratio(a.as_secs_f64(), b.as_secs_f64())
}

/// Milliseconds under a second ("4.2 ms", "450 ms"), seconds with two decimals
/// above ("2.60 s").
fn fmt_time(d: Duration) -> String {
    let secs = d.as_secs_f64();
    let ms = secs * 1000.0;
    if ms < 9.95 {
        format!("{ms:.1} ms")
    } else if ms < 999.5 {
        format!("{ms:.0} ms")
    } else {
        format!("{secs:.2} s")
    }
}

/// Binary units with one decimal ("4.8 MiB"), bytes under 1 KiB.
fn fmt_bytes(n: u64) -> String {
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = "KiB";
    for next in ["MiB", "GiB", "TiB"] {
        if value < 1023.95 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.1} {unit}")
}

/// A number with at most two decimals and no trailing zeros ("0.5", "20").
fn trimmed(x: f64) -> String {
    let s = format!("{x:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

fn fmt_rtt(d: Duration) -> String {
    format!("{} ms", trimmed(d.as_secs_f64() * 1000.0))
}

/// Decimal (SI) bit rates, as links are sold: "200 Mbit/s", "1 Gbit/s".
fn fmt_bandwidth(bps: Option<u64>) -> String {
    match bps {
        None | Some(0) => "unlimited".to_string(),
        Some(bps) => {
            let b = bps as f64;
            let (value, unit) = if b >= 1e9 {
                (b / 1e9, "Gbit/s")
            } else if b >= 1e6 {
                (b / 1e6, "Mbit/s")
            } else if b >= 1e3 {
                (b / 1e3, "kbit/s")
            } else {
                (b, "bit/s")
            };
            format!("{} {unit}", trimmed(value))
        }
    }
}

/// A speed-up: two decimals under 1× (a slow-down), one up to 100×, none above.
fn fmt_speedup(x: f64) -> String {
    if x < 1.0 {
        format!("{x:.2}×")
    } else if x < 100.0 {
        format!("{x:.1}×")
    } else {
        format!("{x:.0}×")
    }
}

/// A factor compared with a goal near 1 ("1.36×").
fn fmt_factor(x: f64) -> String {
    format!("{x:.2}×")
}

fn fmt_percent(fraction: f64) -> String {
    let pct = fraction * 100.0;
    if pct > 0.0 && pct < 0.05 {
        "< 0.1 %".to_string()
    } else {
        format!("{pct:.1} %")
    }
}

fn fmt_fraction((num, den): (u128, u128)) -> String {
    trimmed(num as f64 / den as f64)
}

// ---------------------------------------------------------------------------
// Markdown escaping.

/// Text safe in a paragraph or table cell: markdown punctuation backslash-escaped
/// (CommonMark allows it before any ASCII punctuation), line breaks flattened.
fn md_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '|' | '&' | '~' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// An inline code span holding `s` verbatim: delimited by more backticks than
/// any run inside it. In a table cell `|` must still be escaped (GFM strips the
/// backslash inside code spans there). Empty text gives an empty string.
fn md_code(s: &str, in_table: bool) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.is_empty() {
        return String::new();
    }
    let ticks = "`".repeat(longest_backtick_run(&flat) + 1);
    let pad = if flat.starts_with('`') || flat.ends_with('`') {
        " "
    } else {
        ""
    };
    let body = if in_table {
        flat.replace('|', "\\|")
    } else {
        flat
    };
    format!("{ticks}{pad}{body}{pad}{ticks}")
}

/// A fenced code block holding `s` verbatim.
fn md_fence(s: &str, info: &str) -> String {
    let fence = "`".repeat((longest_backtick_run(s) + 1).max(3));
    format!("{fence}{info}\n{}\n{fence}\n", s.trim_end_matches('\n'))
}

fn longest_backtick_run(s: &str) -> usize {
    s.split(|c| c != '`').map(str::len).max().unwrap_or(0)
}

/// The command as a POSIX shell would need it typed: arguments with anything
/// beyond a safe set are single-quoted.
fn shell_join(args: &[String]) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    args.iter()
        .map(|a| {
            if !a.is_empty() && a.chars().all(safe) {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------
// SVG.

/// Bar colour of each mode: warm modes are lighter tints of their cold mode.
fn mode_colour(mode: Mode) -> &'static str {
    match mode {
        Mode::Full => "#e8833a",
        Mode::Lazy => "#4e79a7",
        Mode::LazyProfile => "#3a9a5b",
        Mode::ThirdParty => "#9c6ade",
        Mode::Learned => "#2f8f8f",
        Mode::WarmFull => "#f3c7a0",
        Mode::WarmLazy => "#a9c4e0",
    }
}

const MARGIN: f64 = 16.0;
const BAR_H: f64 = 11.0;
const BAR_GAP: f64 = 2.0;
const ROW_PAD: f64 = 9.0;
/// Width of a panel's time axis.
const PLOT_W: f64 = 260.0;
/// Room right of a panel's axis for the value written beside the longest bar.
const VALUE_ROOM: f64 = 58.0;
const PANEL_GAP: f64 = 26.0;
/// Workload labels longer than this are cut (the full name is in a tooltip).
const MAX_LABEL_CHARS: usize = 28;

/// Rough width of sans-serif text, enough to size the canvas.
fn text_width(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * size * 0.6
}

/// Text for XML content or a quoted attribute. Characters XML 1.0 forbids
/// (most C0 controls) become U+FFFD so the document stays well-formed.
fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(' '),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Tick spacing of 1, 2 or 5 × 10^k for an axis from 0 to at least `largest`
/// (> 0 and finite): the one with 3 to 8 intervals whose axis ends closest above
/// `largest`, so the bars use most of the panel.
fn nice_step(largest: f64) -> f64 {
    let magnitude = 10f64.powf((largest / 5.0).log10().floor());
    let mut best: Option<(f64, f64)> = None; // (axis end, step)
    for factor in [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0] {
        let step = factor * magnitude;
        let intervals = (largest / step).ceil();
        let end = intervals * step;
        if (3.0..=8.0).contains(&intervals) && best.is_none_or(|(b, _)| end < b) {
            best = Some((end, step));
        }
    }
    // Some factor always fits: `largest / magnitude` lies in [5, 50).
    best.map_or(largest, |(_, step)| step)
}

/// A panel's time axis: 0 to a round maximum, in seconds.
struct Axis {
    step: f64,
    max: f64,
}

impl Axis {
    fn new(largest: f64) -> Self {
        let largest = if largest.is_finite() && largest > 0.0 {
            largest
        } else {
            1.0
        };
        let step = nice_step(largest);
        let max = ((largest / step).ceil() * step).max(step);
        Axis { step, max }
    }

    fn ticks(&self) -> impl Iterator<Item = f64> + '_ {
        // nice_step makes this 3 to 8 intervals.
        let n = (self.max / self.step).round().clamp(1.0, 20.0) as u32;
        (0..=n).map(move |i| f64::from(i) * self.step)
    }

    fn tick_label(&self, v: f64) -> String {
        let decimals = if self.step >= 1.0 {
            0
        } else {
            (-self.step.log10().floor()).clamp(0.0, 9.0) as usize
        };
        format!("{v:.decimals$}")
    }

    /// Offset from the panel's left edge of `secs`.
    fn x(&self, secs: f64) -> f64 {
        (secs / self.max).clamp(0.0, 1.0) * PLOT_W
    }
}

/// The chart's layout, computed once from the view.
struct Chart<'v, 'r> {
    view: &'v View<'r>,
    modes: Vec<Mode>,
    title: String,
    subtitle: String,
    label_w: f64,
    row_h: f64,
    plot_top: f64,
    width: f64,
    height: f64,
}

impl<'v, 'r> Chart<'v, 'r> {
    fn new(view: &'v View<'r>) -> Self {
        let modes: Vec<Mode> = Mode::ALL
            .into_iter()
            .filter(|m| view.rows.iter().any(|r| r.mode == *m))
            .collect();
        let title = if view.profiles.is_empty() {
            "Cold start: median time to ready".to_string()
        } else {
            format!(
                "Cold start: median time to ready at {}",
                view.profiles.join(", ")
            )
        };
        let subtitle = view
            .profiles
            .iter()
            .map(|p| {
                let link = view.profile_link(p);
                if link.is_empty() {
                    p.clone()
                } else {
                    format!("{p}: {link}")
                }
            })
            .collect::<Vec<_>>()
            .join(" · ");
        let label_w = view
            .workloads
            .iter()
            .map(|w| text_width(&truncate(w, MAX_LABEL_CHARS), 12.0))
            .fold(40.0, f64::max)
            + 12.0;
        let group_h = modes.len() as f64 * (BAR_H + BAR_GAP) - BAR_GAP;
        let row_h = group_h.max(BAR_H) + 2.0 * ROW_PAD;
        let plot_top = MARGIN + 110.0;
        let panels = view.profiles.len() as f64;
        let panels_w =
            MARGIN + label_w + panels * (PLOT_W + VALUE_ROOM + PANEL_GAP) - PANEL_GAP + MARGIN;
        let width = [
            panels_w,
            2.0 * MARGIN + text_width(&title, 16.0),
            2.0 * MARGIN + text_width(&subtitle, 12.0),
            2.0 * MARGIN + Self::legend_width(&modes),
            320.0,
        ]
        .into_iter()
        .fold(0.0, f64::max)
        .ceil();
        let height = (plot_top + view.workloads.len() as f64 * row_h + 40.0 + MARGIN).ceil();
        Chart {
            view,
            modes,
            title,
            subtitle,
            label_w,
            row_h,
            plot_top,
            width,
            height,
        }
    }

    fn legend_items(modes: &[Mode]) -> Vec<String> {
        modes
            .iter()
            .map(|m| m.label().to_string())
            .chain(["p95".to_string(), "lower bound".to_string()])
            .collect()
    }

    fn legend_width(modes: &[Mode]) -> f64 {
        Self::legend_items(modes)
            .iter()
            .map(|t| 18.0 + text_width(t, 11.0) + 16.0)
            .sum()
    }

    fn render(&self) -> String {
        let (w, h) = (self.width, self.height);
        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" role="img" aria-labelledby="chart-title">"#
        );
        let _ = writeln!(
            out,
            r#"<title id="chart-title">{}</title>"#,
            xml(&self.title)
        );
        // An opaque background keeps dark text legible on dark-themed viewers.
        let _ = writeln!(
            out,
            r##"<rect x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>"##
        );
        let _ = writeln!(
            out,
            r##"<text x="{MARGIN}" y="{}" font-size="16" font-weight="bold" fill="#222">{}</text>"##,
            MARGIN + 16.0,
            xml(&self.title)
        );
        let _ = writeln!(
            out,
            r##"<text x="{MARGIN}" y="{}" font-size="12" fill="#444">{}</text>"##,
            MARGIN + 36.0,
            xml(&self.subtitle)
        );
        if self.view.rows.is_empty() {
            let _ = writeln!(
                out,
                r##"<text x="{MARGIN}" y="{}" font-size="12" fill="#444">No samples in this run.</text>"##,
                MARGIN + 60.0
            );
        } else {
            self.legend(&mut out);
            self.rows_background(&mut out);
            for (i, profile) in self.view.profiles.iter().enumerate() {
                let x0 = MARGIN + self.label_w + i as f64 * (PLOT_W + VALUE_ROOM + PANEL_GAP);
                self.panel(&mut out, profile, x0);
            }
        }
        out.push_str("</svg>\n");
        out
    }

    fn legend(&self, out: &mut String) {
        let y = MARGIN + 62.0;
        let mut x = MARGIN;
        for (i, label) in Self::legend_items(&self.modes).iter().enumerate() {
            match self.modes.get(i) {
                Some(mode) => {
                    let _ = writeln!(
                        out,
                        r#"<rect x="{x}" y="{}" width="12" height="{BAR_H}" fill="{}"/>"#,
                        y - BAR_H + 1.0,
                        mode_colour(*mode)
                    );
                }
                None if label == "p95" => {
                    let _ = writeln!(
                        out,
                        r##"<path d="M{x} {yc}H{x2}M{x2} {y1}V{y2}" stroke="#222" fill="none"/>"##,
                        yc = y - 4.5,
                        x2 = x + 12.0,
                        y1 = y - 8.0,
                        y2 = y - 1.0
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        r##"<line x1="{x1}" y1="{}" x2="{x1}" y2="{}" stroke="#111" stroke-width="1.5" stroke-dasharray="3 2"/>"##,
                        y - 11.0,
                        y + 2.0,
                        x1 = x + 6.0
                    );
                }
            }
            let _ = writeln!(
                out,
                r##"<text x="{}" y="{y}" font-size="11" fill="#222">{}</text>"##,
                x + 18.0,
                xml(label)
            );
            x += 18.0 + text_width(label, 11.0) + 16.0;
        }
    }

    /// Alternate row shading across all panels, so a workload reads across.
    fn rows_background(&self, out: &mut String) {
        for (i, workload) in self.view.workloads.iter().enumerate() {
            let y = self.plot_top + i as f64 * self.row_h;
            if i % 2 == 1 {
                let _ = writeln!(
                    out,
                    r##"<rect x="{MARGIN}" y="{y}" width="{}" height="{}" fill="#f3f5f7"/>"##,
                    self.width - 2.0 * MARGIN,
                    self.row_h
                );
            }
            let label = truncate(workload, MAX_LABEL_CHARS);
            let _ = writeln!(
                out,
                r##"<text x="{}" y="{}" font-size="12" text-anchor="end" fill="#222"><title>{}</title>{}</text>"##,
                MARGIN + self.label_w - 8.0,
                y + self.row_h / 2.0 + 4.0,
                xml(workload),
                xml(&label)
            );
        }
    }

    fn panel(&self, out: &mut String, profile: &str, x0: f64) {
        let view = self.view;
        let rows: Vec<&Summary> = view.rows.iter().filter(|r| r.profile == profile).collect();
        let largest = rows
            .iter()
            .flat_map(|r| [Some(r.total.p95), view.lower_bound(r)])
            .flatten()
            .map(|d| d.as_secs_f64())
            .fold(0.0, f64::max);
        let axis = Axis::new(largest);
        let bottom = self.plot_top + view.workloads.len() as f64 * self.row_h;

        let link = view.profile_link(profile);
        let _ = writeln!(
            out,
            r##"<text x="{x0}" y="{}" font-size="13" fill="#222"><tspan font-weight="bold">{}</tspan>{}</text>"##,
            self.plot_top - 12.0,
            xml(profile),
            if link.is_empty() {
                String::new()
            } else {
                xml(&format!(" — {link}"))
            }
        );
        for v in axis.ticks() {
            let x = x0 + axis.x(v);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="#dde1e5"/>"##,
                self.plot_top,
                bottom + 4.0
            );
            let _ = writeln!(
                out,
                r##"<text x="{x:.1}" y="{}" font-size="10" text-anchor="middle" fill="#444">{}</text>"##,
                bottom + 16.0,
                axis.tick_label(v)
            );
        }
        let _ = writeln!(
            out,
            r##"<path d="M{x0} {}V{bottom}H{}" stroke="#777" fill="none"/>"##,
            self.plot_top,
            x0 + PLOT_W
        );
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" font-size="11" text-anchor="middle" fill="#222">median total time, seconds</text>"##,
            x0 + PLOT_W / 2.0,
            bottom + 32.0
        );

        for (i, workload) in view.workloads.iter().enumerate() {
            let group_top = self.plot_top + i as f64 * self.row_h + ROW_PAD;
            // Values are written after the lower-bound line, which runs under them.
            let mut values = String::new();
            for (k, mode) in self.modes.iter().enumerate() {
                let Some(r) = view.get(workload, profile, *mode) else {
                    continue;
                };
                let y = group_top + k as f64 * (BAR_H + BAR_GAP);
                let yc = y + BAR_H / 2.0;
                let median = axis.x(r.total.median.as_secs_f64());
                let p95 = axis.x(r.total.p95.as_secs_f64());
                let _ = writeln!(
                    out,
                    r#"<rect class="bar" data-workload="{}" data-profile="{}" data-mode="{}" x="{x0}" y="{y:.1}" width="{median:.1}" height="{BAR_H}" fill="{}"><title>{}</title></rect>"#,
                    xml(workload),
                    xml(profile),
                    xml(mode.label()),
                    mode_colour(*mode),
                    xml(&format!(
                        "{workload}, {profile}, {mode}: median {}, p95 {} ({} samples)",
                        fmt_time(r.total.median),
                        fmt_time(r.total.p95),
                        r.samples
                    ))
                );
                let _ = writeln!(
                    out,
                    r##"<path d="M{:.1} {yc:.1}H{:.1}M{:.1} {:.1}V{:.1}" stroke="#222" fill="none"/>"##,
                    x0 + median,
                    x0 + p95,
                    x0 + p95,
                    yc - 3.5,
                    yc + 3.5
                );
                // A white halo keeps the value legible over the lower-bound line.
                let _ = writeln!(
                    values,
                    r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#333" stroke="#fff" stroke-width="3" stroke-linejoin="round" paint-order="stroke">{}</text>"##,
                    x0 + median.max(p95) + 4.0,
                    yc + 3.5,
                    xml(&fmt_time(r.total.median))
                );
            }
            let bound = self
                .modes
                .iter()
                .filter(|m| m.is_cold())
                .find_map(|m| view.get(workload, profile, *m))
                .and_then(|r| view.lower_bound(r));
            if let Some(bound) = bound {
                let x = x0 + axis.x(bound.as_secs_f64());
                let group_h = self.row_h - 2.0 * ROW_PAD;
                let _ = writeln!(
                    out,
                    r##"<line class="lower-bound" x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#111" stroke-width="1.5" stroke-dasharray="3 2"><title>{}</title></line>"##,
                    group_top - 4.0,
                    group_top + group_h + 4.0,
                    xml(&format!(
                        "{workload}, {profile}: lower bound {}",
                        fmt_time(bound)
                    ))
                );
            }
            out.push_str(&values);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{RunInfo, Sample};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Five samples of a row whose medians are `pull`, `run` (ms) and `fetched`,
    /// and whose total p95 (the largest, nearest rank of 5) is 30 ms above the
    /// median for cold rows and 10 ms above for warm rows (no pull).
    fn five(
        run: &mut BenchRun,
        workload: &str,
        profile: &str,
        mode: Mode,
        (pull, run_ms): (u64, u64),
        fetched: u64,
    ) {
        for i in 0..5u64 {
            // Offsets -2..=2 around the median, in a shuffled order.
            let off = [2i64, -1, 0, -2, 1][i as usize];
            let shift = |base: u64, step: i64| -> Duration {
                if base == 0 {
                    Duration::ZERO
                } else {
                    ms(base.checked_add_signed(off * step).unwrap())
                }
            };
            run.samples.push(Sample {
                workload: workload.into(),
                profile: profile.into(),
                mode,
                index: i as u32,
                pull: shift(pull, 10),
                run: shift(run_ms, 5),
                fetched_bytes: if fetched == 0 {
                    0
                } else {
                    fetched.checked_add_signed(off).unwrap()
                },
                requests: 40 + i,
                blocking_misses: if mode.is_cold() && mode != Mode::Full {
                    7
                } else {
                    0
                },
                snapshotter_cpu: ms(100 + i),
            });
        }
    }

    /// python-print and node at region (20 ms, 200 Mbit/s) and wan (80 ms,
    /// 50 Mbit/s), all five modes, five samples each. Lower bounds, with four
    /// set-up round trips:
    /// - python-print (5 MB working set, warm run 50 ms): region 80 + 200 + 50 =
    ///   330 ms, wan 320 + 800 + 50 = 1170 ms;
    /// - node (20 MB working set, warm run 100 ms): region 80 + 800 + 100 =
    ///   980 ms, wan 320 + 3200 + 100 = 3620 ms.
    fn synthetic() -> BenchRun {
        let mut run = BenchRun {
            info: RunInfo {
                command: "zest bench --profiles region,wan --samples 5".into(),
                machine: "test machine, 2 cores".into(),
                zest_version: "0.1.0".into(),
                build: "commit 0123abc, release build".into(),
                load_start: "0.10 0.20 0.30 1/100 42".into(),
                load_end: "1.50 0.60 0.40 2/101 43".into(),
                node_filesystem: "ext4 with a journal".into(),
                started: "2025-01-02T03:04:05Z".into(),
                profiles: vec![
                    ProfileInfo {
                        name: "region".into(),
                        rtt: ms(20),
                        bandwidth_bps: Some(200_000_000),
                    },
                    ProfileInfo {
                        name: "wan".into(),
                        rtt: ms(80),
                        bandwidth_bps: Some(50_000_000),
                    },
                ],
                workloads: vec![
                    WorkloadInfo {
                        name: "python-print".into(),
                        command: vec!["python3".into(), "-c".into(), "print('hello')".into()],
                        ready: "hello".into(),
                        gzip_bytes: 30 << 20,
                        chunked_bytes: 32 << 20,
                        third_party_bytes: 33 << 20,
                        third_party_format: Some("zstd:chunked, new generation (tar-split)".into()),
                        working_set_bytes: Some(5_000_000),
                        setup_round_trips: 4,
                    },
                    WorkloadInfo {
                        name: "node".into(),
                        command: vec!["node".into(), "-e".into(), "console.log(1)".into()],
                        ready: "1".into(),
                        gzip_bytes: 60_000_000,
                        chunked_bytes: 64_000_000,
                        third_party_bytes: 66_000_000,
                        third_party_format: Some("zstd:chunked, new generation (tar-split)".into()),
                        working_set_bytes: Some(20_000_000),
                        setup_round_trips: 4,
                    },
                ],
            },
            samples: Vec::new(),
        };
        let r = &mut run;
        // python-print: every goal met.
        five(
            r,
            "python-print",
            "region",
            Mode::Full,
            (2500, 100),
            31_500_000,
        );
        five(
            r,
            "python-print",
            "region",
            Mode::Lazy,
            (150, 450),
            9_000_000,
        );
        five(
            r,
            "python-print",
            "region",
            Mode::LazyProfile,
            (150, 250),
            6_000_000,
        );
        five(
            r,
            "python-print",
            "region",
            Mode::ThirdParty,
            (150, 150),
            8_000_000,
        );
        five(r, "python-print", "region", Mode::WarmFull, (0, 50), 0);
        five(r, "python-print", "region", Mode::WarmLazy, (0, 54), 0);
        five(
            r,
            "python-print",
            "wan",
            Mode::Full,
            (9000, 100),
            31_500_000,
        );
        five(r, "python-print", "wan", Mode::Lazy, (400, 2600), 9_000_000);
        five(
            r,
            "python-print",
            "wan",
            Mode::LazyProfile,
            (400, 1200),
            6_500_000,
        );
        five(
            r,
            "python-print",
            "wan",
            Mode::ThirdParty,
            (400, 2000),
            8_500_000,
        );
        five(r, "python-print", "wan", Mode::WarmFull, (0, 50), 0);
        five(r, "python-print", "wan", Mode::WarmLazy, (0, 53), 0);
        // node: every goal missed.
        five(r, "node", "region", Mode::Full, (4000, 200), 61_000_000);
        five(r, "node", "region", Mode::Lazy, (200, 3000), 45_000_000);
        five(
            r,
            "node",
            "region",
            Mode::LazyProfile,
            (200, 1800),
            30_000_000,
        );
        five(
            r,
            "node",
            "region",
            Mode::ThirdParty,
            (200, 3000),
            44_000_000,
        );
        five(r, "node", "region", Mode::WarmFull, (0, 100), 0);
        five(r, "node", "region", Mode::WarmLazy, (0, 120), 0);
        five(r, "node", "wan", Mode::Full, (14000, 200), 61_000_000);
        five(r, "node", "wan", Mode::Lazy, (500, 14500), 46_000_000);
        five(r, "node", "wan", Mode::LazyProfile, (500, 5000), 50_000_000);
        five(r, "node", "wan", Mode::ThirdParty, (500, 14500), 45_000_000);
        five(r, "node", "wan", Mode::WarmFull, (0, 100), 0);
        five(r, "node", "wan", Mode::WarmLazy, (0, 130), 0);
        run
    }

    /// The cells of the table row for (workload, mode) in the section headed by
    /// `heading`, in its first (`table` = 0) or second table.
    fn row(md: &str, heading: &str, table: usize, workload: &str, mode: &str) -> Vec<String> {
        let section = md
            .split("\n### ")
            .find(|s| s.starts_with(heading))
            .unwrap_or_else(|| panic!("no section {heading:?} in:\n{md}"));
        let tables: Vec<&str> = section
            .split("\n\n")
            .filter(|b| b.trim_start().starts_with("| workload"))
            .collect();
        tables[table]
            .lines()
            .map(|l| {
                l.trim()
                    .trim_matches('|')
                    .split(" | ")
                    .map(|c| c.trim().to_string())
                    .collect::<Vec<_>>()
            })
            .find(|cells| cells[0] == workload && cells[1] == mode)
            .unwrap_or_else(|| panic!("no row {workload} {mode} in:\n{section}"))
    }

    /// The goal lines of the markdown, one per check.
    fn goal_lines(md: &str) -> Vec<&str> {
        let goals = md.split("### Goals").nth(1).expect("goals section");
        goals.lines().filter(|l| l.starts_with("  - ")).collect()
    }

    fn goal_line<'a>(md: &'a str, goal: &str, workload: &str) -> &'a str {
        let goals = md.split("### Goals").nth(1).expect("goals section");
        let block = goals
            .split("\n- **")
            .find(|b| b.starts_with(goal))
            .unwrap_or_else(|| panic!("no goal {goal:?} in:\n{goals}"));
        block
            .lines()
            .find(|l| l.starts_with(&format!("  - {workload}")))
            .unwrap_or_else(|| panic!("no line for {workload} under {goal:?}:\n{block}"))
    }

    #[test]
    fn markdown_shows_context() {
        let md = markdown(&synthetic());
        assert!(md.contains("```sh\nzest bench --profiles region,wan --samples 5\n```"));
        assert!(md.contains("- Machine: test machine, 2 cores"));
        assert!(md.contains("- zest: 0.1.0"));
        assert!(md.contains("- Build: commit 0123abc, release build"));
        assert!(md.contains("- Nodes' state on: ext4 with a journal"));
        assert!(md.contains("- Load (/proc/loadavg): 0.10 0.20 0.30 1/100 42 at the start"));
        assert!(md.contains("- Started: 2025-01-02T03:04:05Z"));
        assert!(md.contains("- Samples: 120"));
        assert!(md.contains("| region | 20 ms | 200 Mbit/s |"));
        assert!(md.contains("| wan | 80 ms | 50 Mbit/s |"));
        assert!(md.contains(
            "| python-print | `python3 -c 'print('\\''hello'\\'')'` | `hello` | 30.0 MiB | \
             32.0 MiB | 33.0 MiB (zstd:chunked, new generation (tar-split)) | 4.8 MiB |"
        ));
        assert!(md.contains("### `region`: 20 ms RTT, 200 Mbit/s"));
        assert!(md.contains("### `wan`: 80 ms RTT, 50 Mbit/s"));
        assert!(!md.contains("NaN") && !md.contains("inf"), "{md}");
    }

    #[test]
    fn markdown_times_speedups_and_lower_bounds() {
        let md = markdown(&synthetic());
        // Columns: workload, mode, samples, pull, run, total, total p95,
        // speed-up, lower bound, total ÷ lower bound.
        let full = row(&md, "`region`", 0, "python-print", "full");
        assert_eq!(
            full,
            [
                "python-print",
                "full",
                "5",
                "2.50 s",
                "100 ms",
                "2.60 s",
                "2.63 s",
                "",
                "330 ms",
                "7.88×"
            ]
        );
        // 2600 / 400 = 6.5×; 400 / 330 = 1.21×.
        let lp = row(&md, "`region`", 0, "python-print", "lazy+profile");
        assert_eq!(
            lp[3..],
            ["150 ms", "250 ms", "400 ms", "430 ms", "6.5×", "330 ms", "1.21×"]
        );
        // 2600 / 300 = 8.67×.
        assert_eq!(
            row(&md, "`region`", 0, "python-print", "lazy (skopeo)")[7],
            "8.7×"
        );
        // 2600 / 600 = 4.33×.
        assert_eq!(row(&md, "`region`", 0, "python-print", "lazy")[7], "4.3×");
        // Warm rows: no pull, no lower bound; zest compared with overlayfs
        // (50 / 54 = 0.93×).
        let warm = row(&md, "`region`", 0, "python-print", "warm (overlayfs)");
        assert_eq!(warm[3..], ["", "50 ms", "50 ms", "60 ms", "", "", ""]);
        let warm_zest = row(&md, "`region`", 0, "python-print", "warm (zest)");
        assert_eq!(warm_zest[5], "54 ms");
        assert_eq!(warm_zest[7], "0.93× vs warm (overlayfs)");
        assert_eq!(warm_zest[8], "");
        // node at wan: lazy is slower than full (14200 / 15000 = 0.95×); lower
        // bound 3620 ms, 15000 / 3620 = 4.14×.
        let lazy = row(&md, "`wan`", 0, "node", "lazy");
        assert_eq!(
            lazy[5..],
            ["15.00 s", "15.03 s", "0.95×", "3.62 s", "4.14×"]
        );
    }

    #[test]
    fn markdown_transfer_table() {
        let md = markdown(&synthetic());
        // Columns: workload, mode, fetched, ÷ image, ÷ working set, requests,
        // blocking misses, CPU.
        // 31.5 MB of a 30 MiB gzip image: 100.1 %.
        let full = row(&md, "`region`", 1, "python-print", "full");
        assert_eq!(
            full,
            [
                "python-print",
                "full",
                "30.0 MiB",
                "100.1 %",
                "",
                "42",
                "",
                "102 ms"
            ]
        );
        // 6 MB of a 32 MiB chunked image (17.9 %) and of a 5 MB working set (1.20×).
        let lp = row(&md, "`region`", 1, "python-print", "lazy+profile");
        assert_eq!(lp[2..], ["5.7 MiB", "17.9 %", "1.20×", "42", "7", "102 ms"]);
        let warm = row(&md, "`wan`", 1, "node", "warm (zest)");
        assert_eq!(warm[2..], ["0 B", "0.0 %", "", "42", "0", "102 ms"]);
    }

    #[test]
    fn markdown_goal_verdicts() {
        let md = markdown(&synthetic());
        assert_eq!(goal_lines(&md).len(), 10, "{md}");
        let a = "(a) an unprofiled start";
        // 2600 / 300 = 8.7×.
        assert_eq!(
            goal_line(&md, a, "python-print"),
            "  - python-print: met: 8.7× faster, goal 8× (full 2.60 s, lazy (skopeo) 300 ms)"
        );
        // 4200 / 3200 = 1.3×.
        assert_eq!(
            goal_line(&md, a, "node"),
            "  - node: **missed**: 1.3× faster, goal 8× (full 4.20 s, lazy (skopeo) 3.20 s)"
        );
        let b = "(b) a profiled start";
        // 400 / 330 = 1.21×.
        assert!(goal_line(&md, b, "python-print").starts_with("  - python-print: met: 1.21×"));
        // 2000 / 980 = 2.04×.
        assert_eq!(
            goal_line(&md, b, "node"),
            "  - node: **missed**: 2.04× the lower bound (lazy+profile 2.00 s, lower bound 980 ms)"
        );
        let c = "(c) no lazy mode slower";
        // 9100 / 3000 = 3.0×, 9100 / 2400 = 3.8×, 9100 / 1600 = 5.7×.
        assert_eq!(
            goal_line(&md, c, "python-print"),
            "  - python-print: met: full 9.10 s, lazy 3.00 s (3.0× faster), \
             lazy (skopeo) 2.40 s (3.8× faster), lazy+profile 1.60 s (5.7× faster)"
        );
        // 15000 / 14200 = 1.06× slower; 14200 / 5500 = 2.6× faster.
        assert_eq!(
            goal_line(&md, c, "node"),
            "  - node: **missed**: full 14.20 s, lazy 15.00 s (1.1× slower), \
             lazy (skopeo) 15.00 s (1.1× slower), lazy+profile 5.50 s (2.6× faster)"
        );
        let d = "(d) warm (zest) within 1.1×";
        // Worst profile: region, 54 / 50 = 1.08× (wan is 53 / 50).
        assert_eq!(
            goal_line(&md, d, "python-print"),
            "  - python-print: met: 1.08× at `region` (warm (zest) 54 ms, \
             warm (overlayfs) 50 ms; worst of 2 profiles)"
        );
        // Worst profile: wan, 130 / 100.
        assert_eq!(
            goal_line(&md, d, "node"),
            "  - node: **missed**: 1.30× at `wan` (warm (zest) 130 ms, \
             warm (overlayfs) 100 ms; worst of 2 profiles)"
        );
        let e = "(e) bytes fetched";
        // Largest: wan, 8.5 MB / 5 MB = 1.70×.
        assert!(goal_line(&md, e, "python-print (lazy (skopeo))")
            .starts_with("  - python-print (lazy (skopeo)): met: 1.70× the working set at `wan`"));
        // Largest: wan, 45 MB / 20 MB = 2.25×.
        assert!(goal_line(&md, e, "node (lazy (skopeo))")
            .starts_with("  - node (lazy (skopeo)): **missed**: 2.25× the working set at `wan`"));
    }

    #[test]
    fn goals_sit_on_exact_thresholds() {
        // python-print's `mode` at region made `extra` ms slower.
        let slower = |mode: Mode, extra: u64| {
            let mut run = synthetic();
            for s in &mut run.samples {
                if s.profile == "region" && s.mode == mode {
                    s.run += ms(extra);
                }
            }
            markdown(&run)
        };
        let speedup = "(a) an unprofiled start";
        let bound = "(b) a profiled start";
        // 429 ms is exactly 1.3 × the 330 ms bound; 430 ms is above it.
        assert!(
            goal_line(&slower(Mode::LazyProfile, 29), bound, "python-print")
                .starts_with("  - python-print: met: 1.30×")
        );
        assert!(
            goal_line(&slower(Mode::LazyProfile, 30), bound, "python-print")
                .starts_with("  - python-print: **missed**: 1.30×")
        );
        // 325 ms is exactly 8× faster than 2600 ms; 326 ms is not, though both print 8.0×.
        assert!(
            goal_line(&slower(Mode::ThirdParty, 25), speedup, "python-print")
                .starts_with("  - python-print: met: 8.0× faster")
        );
        assert!(
            goal_line(&slower(Mode::ThirdParty, 26), speedup, "python-print")
                .starts_with("  - python-print: **missed**: 8.0× faster")
        );
    }

    #[test]
    fn empty_and_partial_runs_render() {
        let empty = BenchRun::default();
        let md = markdown(&empty);
        assert!(md.contains("No samples were recorded"));
        assert!(md.contains("not recorded"));
        roxmltree::Document::parse(&svg(&empty)).expect("empty run's SVG is XML");

        // Only lazy rows, a profile and a workload the info does not describe,
        // zero sizes and zero times: nothing to compare with, nothing divided by 0.
        let mut run = synthetic();
        run.samples.retain(|s| s.mode == Mode::Lazy);
        for w in &mut run.info.workloads {
            w.gzip_bytes = 0;
            w.chunked_bytes = 0;
            w.working_set_bytes = Some(0);
        }
        let mut stray = run.samples[0].clone();
        stray.workload = "unlisted".into();
        stray.profile = "moon".into();
        stray.pull = Duration::ZERO;
        stray.run = Duration::ZERO;
        run.samples.push(stray);
        let md = markdown(&run);
        for bad in ["NaN", "inf", "∞"] {
            assert!(!md.contains(bad), "{bad} in:\n{md}");
        }
        assert!(md.contains("### `moon`\n"));
        let lazy = row(&md, "`region`", 0, "python-print", "lazy");
        assert_eq!(lazy[7], "", "no full row, no speed-up");
        // The lower bound needs a warm (overlayfs) run.
        assert_eq!(lazy[8], "");
        let bytes = row(&md, "`region`", 1, "python-print", "lazy");
        assert_eq!((bytes[3].as_str(), bytes[4].as_str()), ("", ""));
        // (e) has a zero working set: the verdict stands, the ratio is left out.
        assert!(goal_line(&md, "(e)", "python-print (lazy)")
            .starts_with("  - python-print (lazy): **missed**: at `region`"));
        assert_eq!(goal_lines(&md).len(), 2, "only (e) can be checked:\n{md}");
        let chart = svg(&run);
        roxmltree::Document::parse(&chart).expect("partial run's SVG is XML");
        assert!(!chart.contains("NaN") && !chart.contains("inf"));

        // Only warm rows: no goal but (d).
        let mut run = synthetic();
        run.samples.retain(|s| !s.mode.is_cold());
        let md = markdown(&run);
        assert_eq!(goal_lines(&md).len(), 2, "{md}");
        // Only full rows: no goal at all.
        let mut run = synthetic();
        run.samples.retain(|s| s.mode == Mode::Full);
        assert!(markdown(&run).contains("This run has no data to check a goal against."));

        // Absurd figures, as a hand-edited file could hold, still render.
        let mut run = synthetic();
        for s in run.samples.iter_mut().step_by(3) {
            s.pull = Duration::MAX;
            s.run = Duration::MAX;
            s.fetched_bytes = u64::MAX;
        }
        run.info.workloads[0].working_set_bytes = Some(u64::MAX);
        run.info.profiles[0].rtt = Duration::MAX;
        let md = markdown(&run);
        assert!(!md.contains("NaN") && !md.contains("inf"), "{md}");
        let chart = svg(&run);
        roxmltree::Document::parse(&chart).expect("absurd run's SVG is XML");
        assert!(!chart.contains("NaN") && !chart.contains("inf"));
    }

    #[test]
    fn svg_is_xml_with_one_bar_per_summary() {
        let run = synthetic();
        let chart = svg(&run);
        let doc = roxmltree::Document::parse(&chart).expect("SVG is well-formed XML");
        let bars: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("rect") && n.attribute("class") == Some("bar"))
            .collect();
        let summaries = run.summaries();
        assert_eq!(bars.len(), summaries.len());
        assert_eq!(bars.len(), 24);
        for s in &summaries {
            assert!(
                bars.iter()
                    .any(|b| b.attribute("data-workload") == Some(&s.workload)
                        && b.attribute("data-profile") == Some(&s.profile)
                        && b.attribute("data-mode") == Some(s.mode.label())),
                "no bar for {} {} {}",
                s.workload,
                s.profile,
                s.mode
            );
        }
        // One lower-bound marker per (workload, profile).
        let bounds = doc
            .descendants()
            .filter(|n| n.attribute("class") == Some("lower-bound"))
            .count();
        assert_eq!(bounds, 4);
        let title = doc
            .descendants()
            .find(|n| n.has_tag_name("title"))
            .and_then(|n| n.text())
            .unwrap_or_default();
        assert!(title.contains("region, wan"), "{title}");
        // Bars are as long as their medians on the panel's axis: at region the
        // axis ends at 5 s (largest: node full p95 4.23 s, ticks every second),
        // so python-print's full bar (2.60 s) is 0.52 × 260 = 135.2 px long.
        let full = bars
            .iter()
            .find(|b| {
                b.attribute("data-workload") == Some("python-print")
                    && b.attribute("data-profile") == Some("region")
                    && b.attribute("data-mode") == Some("full")
            })
            .unwrap();
        assert_eq!(full.attribute("width"), Some("135.2"));
    }

    #[test]
    fn hostile_names_are_escaped() {
        let mut run = synthetic();
        let name = "a<&\"b|`c`\n";
        for s in &mut run.samples {
            if s.workload == "node" {
                s.workload = name.into();
            }
        }
        run.info.workloads[1].name = name.into();
        run.info.workloads[1].command = vec!["sh".into(), "-c".into(), "echo `a|b`".into()];

        let chart = svg(&run);
        assert!(!chart.contains("a<&\"b"));
        assert!(chart.contains("a&lt;&amp;&quot;b"));
        let doc = roxmltree::Document::parse(&chart).expect("SVG is well-formed XML");
        let bars = doc
            .descendants()
            .filter(|n| n.attribute("data-workload") == Some("a<&\"b|`c` "))
            .count();
        assert_eq!(bars, 12);

        let md = markdown(&run);
        assert!(
            md.contains("| a\\<\\&\"b\\|\\`c\\`  | ``sh -c 'echo `a\\|b`'`` |"),
            "{md}"
        );
        assert!(!md.contains("a<&"));
    }

    #[test]
    fn figures_format() {
        assert_eq!(fmt_time(Duration::ZERO), "0.0 ms");
        assert_eq!(fmt_time(Duration::from_micros(4_240)), "4.2 ms");
        assert_eq!(fmt_time(ms(450)), "450 ms");
        assert_eq!(fmt_time(Duration::from_micros(999_600)), "1.00 s");
        assert_eq!(fmt_time(ms(12_345)), "12.35 s");
        assert_eq!(fmt_bytes(0), "0 B");
        assert_eq!(fmt_bytes(1023), "1023 B");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(fmt_bytes(5_000_000), "4.8 MiB");
        assert_eq!(fmt_bytes(u64::MAX), "16777216.0 TiB");
        assert_eq!(fmt_bandwidth(Some(1_000_000_000)), "1 Gbit/s");
        assert_eq!(fmt_bandwidth(Some(1_500_000)), "1.5 Mbit/s");
        assert_eq!(fmt_bandwidth(None), "unlimited");
        assert_eq!(fmt_rtt(Duration::from_micros(500)), "0.5 ms");
        assert_eq!(fmt_percent(0.0001), "< 0.1 %");
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(
            shell_join(&["a b".into(), "it's".into(), "".into()]),
            "'a b' 'it'\\''s' ''"
        );
        assert_eq!(md_code("a`b", false), "``a`b``");
        assert_eq!(md_code("`a", false), "`` `a ``");
        assert_eq!(md_fence("x ``` y", "sh"), "````sh\nx ``` y\n````\n");
        let axis = Axis::new(4.23);
        assert_eq!((axis.step, axis.max), (1.0, 5.0));
        let axis = Axis::new(15.03);
        assert_eq!((axis.step, axis.max), (2.0, 16.0));
        // 0 to 0.35 by 0.05 fits 0.33 better than 0 to 0.4 by 0.1.
        let axis = Axis::new(0.33);
        assert!((axis.step - 0.05).abs() < 1e-12 && (axis.max - 0.35).abs() < 1e-12);
        assert_eq!(axis.tick_label(0.2), "0.20");
        assert_eq!(axis.ticks().count(), 8);
        for largest in [1e-9, 0.0123, 0.999, 1.0, 7.7, 49.9, 50.0, 1234.5, 1e12] {
            let axis = Axis::new(largest);
            let n = axis.ticks().count() - 1;
            assert!(
                axis.max >= largest && (3..=8).contains(&n),
                "{largest}: {n}"
            );
        }
    }
}
