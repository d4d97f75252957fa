//! The printed table and its CSV.

use crate::run::Figures;
use crate::stack::Stack;

/// (markdown header, CSV header, value, decimals in the markdown)
type Column = (&'static str, &'static str, f64, usize);

fn columns(f: &Figures) -> Vec<Column> {
    vec![
        ("claims/s to all Bound", "claims_per_s", f.claims_per_s, 1),
        ("claim→Bound p50 ms", "bound_p50_ms", f.bound_p50, 0),
        ("p99 ms", "bound_p99_ms", f.bound_p99, 0),
        (
            "idle claim→Bound p50 ms",
            "idle_bound_p50_ms",
            f.idle_p50,
            0,
        ),
        ("idle p99 ms", "idle_bound_p99_ms", f.idle_p99, 0),
        ("claims Lost idle", "idle_lost", f.idle_lost as f64, 0),
        ("Lost burst", "burst_lost", f.burst_lost as f64, 0),
        ("attaches/s", "attach_per_s", f.attach_per_s, 1),
        ("pod→attached p50 ms", "attach_p50_ms", f.attach_p50, 0),
        ("p99 ms", "attach_p99_ms", f.attach_p99, 0),
        ("VA→attached p50 ms", "va_attach_p50_ms", f.va_p50, 0),
        ("p99 ms", "va_attach_p99_ms", f.va_p99, 0),
        (
            "API writes/volume",
            "api_writes_per_volume",
            f.writes_per_volume,
            1,
        ),
        (
            "API reads/volume",
            "api_reads_per_volume",
            f.reads_per_volume,
            1,
        ),
        ("peak RSS MiB (summed)", "peak_rss_mib", f.rss_mib, 1),
        ("teardown s", "teardown_s", f.teardown_s, 1),
    ]
}

/// Markdown (title, stacks, table, ratios, notes) and CSV of `results`.
pub fn report(n: usize, driver: &str, results: &[Figures]) -> (String, String) {
    let mut md = format!(
        "## stowage vs CSI sidecars: {n} claims, {driver} (attachRequired), one control plane\n\n"
    );
    for f in results {
        md.push_str(&format!("- `{}`: {}\n", f.stack.name(), f.stack.describe()));
    }
    let mut csv = String::new();
    if let Some(first) = results.first() {
        let cols = columns(first);
        md.push_str("\n| stack |");
        csv.push_str("stack,n,idle_claims");
        for (title, key, _, _) in &cols {
            md.push_str(&format!(" {title} |"));
            csv.push_str(&format!(",{key}"));
        }
        md.push_str(&format!("\n|---|{}\n", "---:|".repeat(cols.len())));
        csv.push('\n');
    }
    for f in results {
        md.push_str(&format!("| {} |", f.stack.name()));
        csv.push_str(&format!("{},{n},{}", f.stack.name(), f.idle_claims));
        for (_, _, value, decimals) in columns(f) {
            md.push_str(&format!(" {value:.decimals$} |"));
            csv.push_str(&format!(",{value:.2}"));
        }
        md.push('\n');
        csv.push('\n');
    }
    md.push_str(&ratios(results));
    let idle = results.first().map_or(0, |f| f.idle_claims);
    md.push_str(&format!(
        "\nIdle: {idle} claims one at a time, each created once the one before is Bound. \
         Lost: claims kube-controller-manager ever set to phase Lost, idle and burst claims. \
         API requests are all clients' (kube-controller-manager's binder and attach-detach \
         controller included) from apiserver_request_total, over the N-claim and N-pod phases. \
         RSS is VmHWM of the stack's own processes (the driver and kube-controller-manager are \
         common to all stacks and left out).\n",
    ));
    (md, csv)
}

/// stowage against each sidecar stack present.
fn ratios(results: &[Figures]) -> String {
    let find = |stack| results.iter().find(|f| f.stack == stack);
    let Some(ours) = find(Stack::Stowage) else {
        return String::new();
    };
    let mut out = String::from("\n");
    for (label, stack) in [
        ("at defaults", Stack::SidecarsDefault),
        ("at equal API budget", Stack::SidecarsRaised),
    ] {
        if let Some(base) = find(stack) {
            out.push_str(&format!(
                "stowage vs sidecars {label}: {:.1}× claims/s, {:.1}× attaches/s, {:.2}× RSS\n",
                ours.claims_per_s / base.claims_per_s,
                ours.attach_per_s / base.attach_per_s,
                ours.rss_mib / base.rss_mib,
            ));
        }
    }
    out
}
