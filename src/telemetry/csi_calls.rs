//! `csi_sidecar_operations_seconds`: the latency of every CSI call stowage
//! makes, with the name, labels and buckets of csi-lib-utils, so that the
//! dashboards and alerts written for the sidecars read stowage unchanged.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tonic::Code;

/// csi-lib-utils' buckets for this histogram, in seconds.
const BUCKETS: [f64; 13] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 25.0, 50.0, 120.0, 300.0, 600.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub driver_name: String,
    /// The full gRPC method, e.g. `/csi.v1.Controller/CreateVolume`.
    pub method_name: String,
    /// Go's name of the gRPC code (`OK`, `DeadlineExceeded`, ...).
    pub grpc_status_code: String,
}

/// One histogram family shared by every driver handle. Unregistered (the
/// default) it still counts, which keeps handles made outside a role
/// (tests, benchmarks) free of a registry.
#[derive(Clone)]
pub struct CsiCalls(Family<CallLabels, Histogram>);

impl Default for CsiCalls {
    fn default() -> Self {
        CsiCalls(Family::new_with_constructor(|| Histogram::new(BUCKETS)))
    }
}

impl CsiCalls {
    /// Registered at the top level, unprefixed: the sidecars' name.
    pub fn register(registry: &mut Registry) -> Self {
        let calls = CsiCalls::default();
        registry.register(
            "csi_sidecar_operations_seconds",
            "Container Storage Interface operation duration with gRPC error code status total",
            calls.0.clone(),
        );
        calls
    }

    pub fn observe(&self, driver: &str, method: &str, code: Code, took: Duration) {
        self.0
            .get_or_create(&CallLabels {
                driver_name: driver.to_string(),
                method_name: method.to_string(),
                grpc_status_code: go_name(code).to_string(),
            })
            .observe(took.as_secs_f64());
    }
}

/// grpc-go's `codes.Code.String()`, which the sidecars' labels carry (it
/// spells Cancelled with one l).
fn go_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn exported_as_the_sidecars_export_it() {
        let mut registry = Registry::default();
        let calls = CsiCalls::register(&mut registry);
        calls.observe(
            "mock.csi.k8s.io",
            "/csi.v1.Controller/CreateVolume",
            Code::Ok,
            Duration::from_millis(300),
        );
        calls.observe(
            "mock.csi.k8s.io",
            "/csi.v1.Controller/CreateVolume",
            Code::Cancelled,
            Duration::from_secs(1),
        );
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        let ok = "csi_sidecar_operations_seconds_bucket{le=\"0.5\",driver_name=\"mock.csi.k8s.io\",method_name=\"/csi.v1.Controller/CreateVolume\",grpc_status_code=\"OK\"} 1";
        assert!(text.contains(ok), "{text}");
        assert!(text.contains("grpc_status_code=\"Canceled\"} 1"), "{text}");
        assert!(text.contains("le=\"600.0\""), "{text}");
        assert!(
            text.contains("# TYPE csi_sidecar_operations_seconds histogram"),
            "{text}"
        );
    }
}
