//! bench_scale's markdown table and CSV, as bench_compare writes them.

use crate::Run;

/// (markdown header, CSV header, value, decimals in the markdown); NaN for
/// what a run does not have (the empty cluster's population).
fn columns(r: &Run) -> Vec<(&'static str, &'static str, f64, usize)> {
    let p = r.populated.as_ref();
    let pop = |f: &dyn Fn(&crate::Populated) -> f64| p.map(f).unwrap_or(f64::NAN);
    vec![
        ("objects", "objects", pop(&|p| p.objects() as f64), 0),
        ("populate s", "populate_s", pop(&|p| p.secs), 1),
        (
            "populate writes/s",
            "populate_writes_per_s",
            pop(&|p| p.writes as f64 / p.secs),
            0,
        ),
        ("settle s", "settle_s", r.settle_s, 1),
        ("started s", "started_s", r.started_s, 2),
        ("first Bound s", "first_bound_s", r.first_bound_s, 2),
        ("at rest s", "at_rest_s", r.at_rest_s, 0),
        ("RSS at start MiB", "rss_started_mib", r.rss_ready_mib, 1),
        ("peak RSS MiB", "peak_rss_mib", r.rss_peak_mib, 1),
        ("claims/s", "claims_per_s", r.claims.per_s, 1),
        ("claim→Bound p50 ms", "bound_p50_ms", r.claims.p50_ms, 0),
        ("p99 ms", "bound_p99_ms", r.claims.p99_ms, 0),
        (
            "API writes/volume",
            "api_writes_per_volume",
            r.claims.writes_per_volume,
            1,
        ),
        (
            "API reads/volume",
            "api_reads_per_volume",
            r.claims.reads_per_volume,
            1,
        ),
    ]
}

fn cell(value: f64, decimals: usize) -> String {
    if value.is_nan() {
        "—".into()
    } else {
        format!("{value:.decimals$}")
    }
}

pub fn render(n: usize, runs: &[Run]) -> (String, String) {
    // Both control planes run kube-controller-manager with these
    // controllers; its PV binder's work grows with the population.
    let controllers = std::env::var("STOWAGE_KCM_CONTROLLERS").unwrap_or_else(|_| "*".into());
    let mut md = format!(
        "## stowage controller start and 1000 new claims on a cluster with {n} claims, PVs and {} Volumes\n\n\
         kube-controller-manager --controllers {controllers}\n\n",
        n.div_ceil(2)
    );
    let mut csv = String::from("cluster,n");
    if let Some(first) = runs.first() {
        md.push_str("| cluster |");
        for (title, key, _, _) in columns(first) {
            md.push_str(&format!(" {title} |"));
            csv.push_str(&format!(",{key}"));
        }
        md.push_str(&format!(
            "\n|---|{}\n",
            "---:|".repeat(columns(first).len())
        ));
        csv.push('\n');
    }
    for r in runs {
        md.push_str(&format!("| {} |", r.label));
        let n = r.populated.as_ref().map_or(0, |p| p.claims);
        csv.push_str(&format!("{},{n}", r.label));
        for (_, _, value, decimals) in columns(r) {
            md.push_str(&format!(" {} |", cell(value, decimals)));
            csv.push_str(&if value.is_nan() {
                ",".to_string()
            } else {
                format!(",{value:.3}")
            });
        }
        md.push('\n');
        csv.push('\n');
    }
    if let [empty, full] = runs {
        md.push_str(&format!(
            "\nnew-claim throughput with {n} pre-populated vs empty: {:.0} % ({:.1} vs {:.1} claims/s)\n",
            100.0 * full.claims.per_s / empty.claims.per_s,
            full.claims.per_s,
            empty.claims.per_s,
        ));
    }
    md.push_str(&cpu_table(runs));
    for r in runs {
        let rounds: Vec<String> = r.rounds.iter().map(|n| format!("{n:.1}")).collect();
        md.push_str(&format!(
            "\nclaims/s of each round of 1000 ({}): {}\n",
            r.label,
            rounds.join(", ")
        ));
        let listings: [Listing; 3] = [
            (
                "API writes per new volume",
                &r.claims.writes_by_resource,
                |n| format!("{n:.1}"),
            ),
            (
                "API requests refused or failed over the new claims",
                &r.claims.refused,
                |n| format!("×{n:.0}"),
            ),
            ("API reads over the new claims", &r.claims.reads, |n| {
                format!("×{n:.0}")
            }),
        ];
        for (title, items, value) in listings {
            md.push_str(&format!(
                "\n{title} ({}): {}\n",
                r.label,
                listing(items, value)
            ));
        }
    }
    md.push_str(
        "\nstarted: `stowage controller` spawned → its log line `controller started` (every \
         watch listed). first Bound: spawned → a claim created before it Bound. RSS: VmHWM of \
         the controller, when that claim was Bound and after the first round. claims/s, latencies, \
         CPU and API requests are the median round's (by claims/s); API requests are all \
         clients', from apiserver_request_total. settle: population \
         done → API writes below 5/s. at rest: spawned → the end of the first 15 s window \
         no less busy than the one before (the rounds start then; \"at rest\" CPU is that \
         window's).\n",
    );
    (md, csv)
}

/// A titled "key value" line: its title, its items and how a value reads.
type Listing<'a> = (&'a str, &'a [(String, f64)], fn(f64) -> String);

/// Per process, one pair of columns per run: CPU cores used at rest, and
/// CPU seconds over the median round of new claims.
fn cpu_table(runs: &[Run]) -> String {
    let Some(first) = runs.first() else {
        return String::new();
    };
    let mut md = String::from("\n| CPU |");
    for r in runs {
        md.push_str(&format!(
            " {} at rest, cores | {} over 1000 new claims, s |",
            r.label, r.label
        ));
    }
    md.push_str(&format!("\n|---|{}\n", "---:|".repeat(2 * runs.len())));
    for (i, (name, _)) in first.claims.cpu.iter().enumerate() {
        md.push_str(&format!("| {name} |"));
        for r in runs {
            md.push_str(&format!(
                " {:.2} | {:.1} |",
                r.idle_cores[i].1, r.claims.cpu[i].1
            ));
        }
        md.push('\n');
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    md.push_str(&format!("| wall time × {cores} cores |"));
    for r in runs {
        md.push_str(&format!(
            " {cores} | {:.1} |",
            r.claims.wall_s * cores as f64
        ));
    }
    md.push('\n');
    md
}

/// "key value, key value", or "none".
fn listing(items: &[(String, f64)], value: impl Fn(f64) -> String) -> String {
    if items.is_empty() {
        return "none".into();
    }
    let items: Vec<String> = items
        .iter()
        .map(|(k, n)| format!("{k} {}", value(*n)))
        .collect();
    items.join(", ")
}
