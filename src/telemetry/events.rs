//! Events as `kubectl describe` should show them. kube's Recorder folds
//! every event of one type, reason and object into one series for six
//! minutes and keeps the first note, so a claim whose reason stays
//! (`ProvisioningFailed`) while its cause changes would go on showing the
//! old cause. Here a changed note starts an event of its own; the same
//! note again still counts up one series, as kube's does.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, Recorder as SeriesRecorder, Reporter};

/// How long a series is remembered: kube's own cache lifetime.
const REMEMBERED: Duration = Duration::from_secs(6 * 60);

#[derive(Clone)]
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    series: std::sync::Arc<Mutex<Remembered>>,
}

/// The series, and when the old ones were last forgotten: at most once
/// per `REMEMBERED`, so an event costs no walk over every series.
struct Remembered {
    series: HashMap<Key, Series>,
    swept: Instant,
}

/// Type, reason and object: what kube's Recorder folds by.
#[derive(Hash, PartialEq, Eq)]
struct Key {
    type_: String,
    reason: String,
    object: [Option<String>; 4],
}

struct Series {
    note: Option<String>,
    recorder: SeriesRecorder,
    last: Instant,
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Recorder {
            client,
            reporter,
            series: std::sync::Arc::new(Mutex::new(Remembered {
                series: HashMap::new(),
                swept: Instant::now(),
            })),
        }
    }

    pub async fn publish(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let recorder = self.series_for(event, regarding);
        recorder.publish(event, regarding).await
    }

    /// The recorder whose series this event continues: a new one (with
    /// no series yet) when the note differs from the last one's.
    fn series_for(&self, event: &Event, regarding: &ObjectReference) -> SeriesRecorder {
        let key = Key {
            type_: format!("{:?}", event.type_),
            reason: event.reason.clone(),
            object: [
                regarding.kind.clone(),
                regarding.namespace.clone(),
                regarding.name.clone(),
                regarding.uid.clone(),
            ],
        };
        let now = Instant::now();
        let mut remembered = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(remembered.swept) >= REMEMBERED {
            remembered
                .series
                .retain(|_, s| now.duration_since(s.last) < REMEMBERED);
            remembered.swept = now;
        }
        let series = remembered.series.entry(key).or_insert_with(|| Series {
            note: event.note.clone(),
            recorder: SeriesRecorder::new(self.client.clone(), self.reporter.clone()),
            last: now,
        });
        if series.note != event.note {
            series.note = event.note.clone();
            series.recorder = SeriesRecorder::new(self.client.clone(), self.reporter.clone());
        }
        series.last = now;
        series.recorder.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::{Request, Response};
    use kube::client::Body;
    use kube::runtime::events::EventType;

    use super::*;

    /// (method, note) of each request the API server got.
    type Seen = Arc<Mutex<Vec<(String, String)>>>;

    /// A client whose API server answers every request with its own body.
    fn echoing() -> (Client, Seen) {
        let seen: Seen = Arc::default();
        let log = seen.clone();
        let service = tower::service_fn(move |request: Request<Body>| {
            let log = log.clone();
            async move {
                let method = request.method().to_string();
                let body = request.into_body().collect_bytes().await?;
                let event: serde_json::Value = serde_json::from_slice(&body)?;
                let note = event["note"].as_str().unwrap_or_default().to_string();
                log.lock().unwrap().push((method, note));
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    Response::builder()
                        .status(201)
                        .body(Body::from(body.to_vec()))?,
                )
            }
        });
        (Client::new(service, "default"), seen)
    }

    fn warning(note: &str) -> Event {
        Event {
            type_: EventType::Warning,
            reason: "ProvisioningFailed".into(),
            note: Some(note.into()),
            action: "Provision".into(),
            secondary: None,
        }
    }

    #[tokio::test]
    async fn a_new_note_is_a_new_event_and_the_same_note_counts_up() {
        let (client, seen) = echoing();
        let reporter = Reporter {
            controller: "stowage".into(),
            instance: None,
        };
        let recorder = Recorder::new(client, reporter);
        let claim = ObjectReference {
            kind: Some("PersistentVolumeClaim".into()),
            namespace: Some("team".into()),
            name: Some("data".into()),
            uid: Some("u1".into()),
            ..Default::default()
        };
        for note in ["no CRD", "no CRD", "no grant", "no grant"] {
            recorder.publish(&warning(note), &claim).await.unwrap();
        }
        let seen = seen.lock().unwrap().clone();
        let expected = [
            ("POST", "no CRD"),
            ("PATCH", "no CRD"),
            ("POST", "no grant"),
            ("PATCH", "no grant"),
        ];
        let seen: Vec<(&str, &str)> = seen.iter().map(|(m, n)| (m.as_str(), n.as_str())).collect();
        assert_eq!(seen, expected);
    }
}
