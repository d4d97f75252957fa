//! Events as `kubectl describe` should show them. kube's Recorder folds
//! every event of one type, reason and object into one series for six
//! minutes and keeps the first note, so a claim whose reason stays
//! (`ProvisioningFailed`) while its cause changes would go on showing the
//! old cause. Here a changed note starts an event of its own; the same
//! note again still counts up one series, as kube's does.
//!
//! The events are the ones kube's Recorder writes (events.k8s.io/v1, named
//! `<object>.<nanoseconds in hex>`), but a series is remembered as its
//! event's name, count and note, not as a kube Recorder holding a cache
//! and the whole Event: a burst of a thousand claims otherwise kept some
//! 14 MB of events for six minutes. A repeat patches only the series
//! (count and last time), and creates the event anew when it was deleted
//! meanwhile.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::{Api, Client};
use serde_json::json;

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
#[derive(Clone, Hash, PartialEq, Eq)]
struct Key {
    type_: EventKind,
    reason: String,
    object: [Option<String>; 4],
}

#[derive(Clone, Copy, Hash, PartialEq, Eq)]
enum EventKind {
    Normal,
    Warning,
}

/// One series as it was last written.
struct Series {
    note: Option<String>,
    /// The Event object's name, in the regarded object's namespace.
    name: String,
    count: i32,
    last: Instant,
}

/// What to write for one event.
enum Write {
    Create,
    /// The series' event, seen `count` times now.
    Count {
        name: String,
        count: i32,
    },
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
        let key = key(event, regarding);
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let events = Api::<K8sEvent>::namespaced(self.client.clone(), namespace);
        let now = Timestamp::now();
        let name = match self.next_write(&key, event) {
            Write::Count { name, count } => {
                let series = json!({ "series": {
                    "count": count, "lastObservedTime": MicroTime(now) } });
                match events
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&series))
                    .await
                {
                    Ok(_) => return Ok(()),
                    // Deleted meanwhile (or expired): a new event it is.
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
                self.create(&events, event, regarding, now).await?
            }
            Write::Create => self.create(&events, event, regarding, now).await?,
        };
        self.remember(key, event, name);
        Ok(())
    }

    /// A series' next event: the count it reaches, or a new event when the
    /// note changed or none was seen lately.
    fn next_write(&self, key: &Key, event: &Event) -> Write {
        let now = Instant::now();
        let mut remembered = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(remembered.swept) >= REMEMBERED {
            remembered
                .series
                .retain(|_, s| now.duration_since(s.last) < REMEMBERED);
            remembered.swept = now;
        }
        match remembered.series.get_mut(key) {
            Some(s) if s.note == event.note && now.duration_since(s.last) < REMEMBERED => {
                s.count += 1;
                s.last = now;
                Write::Count {
                    name: s.name.clone(),
                    count: s.count,
                }
            }
            _ => Write::Create,
        }
    }

    fn remember(&self, key: Key, event: &Event, name: String) {
        let mut remembered = self.series.lock().unwrap_or_else(|e| e.into_inner());
        remembered.series.insert(
            key,
            Series {
                note: event.note.clone(),
                name,
                count: 1,
                last: Instant::now(),
            },
        );
    }

    /// Creates the event as kube's Recorder would; returns its name.
    async fn create(
        &self,
        events: &Api<K8sEvent>,
        event: &Event,
        regarding: &ObjectReference,
        now: Timestamp,
    ) -> Result<String, kube::Error> {
        let controller = &self.reporter.controller;
        let name = format!(
            "{}.{:x}",
            regarding.name.as_deref().unwrap_or(controller),
            now.as_nanosecond()
        );
        let object = K8sEvent {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: regarding.namespace.clone(),
                ..Default::default()
            },
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: event.note.clone(),
            type_: Some(
                match event.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| controller.clone()),
            ),
            ..Default::default()
        };
        events.create(&PostParams::default(), &object).await?;
        Ok(name)
    }
}

fn kind(t: EventType) -> EventKind {
    match t {
        EventType::Normal => EventKind::Normal,
        EventType::Warning => EventKind::Warning,
    }
}

fn key(event: &Event, regarding: &ObjectReference) -> Key {
    Key {
        type_: kind(event.type_),
        reason: event.reason.clone(),
        object: [
            regarding.kind.clone(),
            regarding.namespace.clone(),
            regarding.name.clone(),
            regarding.uid.clone(),
        ],
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use http::{Request, Response};
    use kube::client::Body;
    use kube::runtime::events::EventType;
    use serde_json::Value;

    use super::*;

    /// What the fake API server got: (method, event name, note or count).
    type Seen = Arc<Mutex<Vec<(String, String, String)>>>;
    /// The events it holds, by name.
    type Stored = Arc<Mutex<BTreeMap<String, Value>>>;

    /// A client whose API server keeps events: POST stores one, a merge
    /// PATCH of a stored one applies its series, of another answers 404.
    fn api_server() -> (Client, Seen, Stored) {
        let seen: Seen = Arc::default();
        let stored: Stored = Arc::default();
        let (log, events) = (seen.clone(), stored.clone());
        let service = tower::service_fn(move |request: Request<Body>| {
            let (log, events) = (log.clone(), events.clone());
            async move {
                let method = request.method().to_string();
                let path = request.uri().path().to_string();
                let body: Value =
                    serde_json::from_slice(&request.into_body().collect_bytes().await?)?;
                let mut events = events.lock().unwrap();
                let (status, reply) = if method == "POST" {
                    let name = body["metadata"]["name"].as_str().unwrap().to_string();
                    let note = body["note"].as_str().unwrap_or_default().to_string();
                    log.lock().unwrap().push((method, name.clone(), note));
                    events.insert(name, body.clone());
                    (201, body)
                } else {
                    let name = path.rsplit('/').next().unwrap().to_string();
                    let count = body["series"]["count"].to_string();
                    log.lock().unwrap().push((method, name.clone(), count));
                    match events.get_mut(&name) {
                        Some(event) => {
                            event["series"] = body["series"].clone();
                            (200, event.clone())
                        }
                        None => (
                            404,
                            json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "reason": "NotFound", "code": 404, "message": "not found" }),
                        ),
                    }
                };
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    Response::builder()
                        .status(status)
                        .body(Body::from(serde_json::to_vec(&reply)?))?,
                )
            }
        });
        (Client::new(service, "default"), seen, stored)
    }

    /// (method, note or count) of each request, without the event names.
    fn calls(seen: &[(String, String, String)]) -> Vec<(&str, &str)> {
        seen.iter()
            .map(|(m, _, n)| (m.as_str(), n.as_str()))
            .collect()
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

    fn claim() -> ObjectReference {
        ObjectReference {
            kind: Some("PersistentVolumeClaim".into()),
            namespace: Some("team".into()),
            name: Some("data".into()),
            uid: Some("u1".into()),
            ..Default::default()
        }
    }

    fn recorder(client: Client) -> Recorder {
        let reporter = Reporter {
            controller: "stowage".into(),
            instance: Some("stowage-0".into()),
        };
        Recorder::new(client, reporter)
    }

    #[tokio::test]
    async fn a_new_note_is_a_new_event_and_the_same_note_counts_up() {
        let (client, seen, stored) = api_server();
        let recorder = recorder(client);
        for note in ["no CRD", "no CRD", "no CRD", "no grant", "no grant"] {
            recorder.publish(&warning(note), &claim()).await.unwrap();
        }
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            calls(&seen),
            [
                ("POST", "no CRD"),
                ("PATCH", "2"),
                ("PATCH", "3"),
                ("POST", "no grant"),
                ("PATCH", "2"),
            ]
        );
        assert_eq!(seen[0].1, seen[1].1, "a repeat patches its series' event");
        assert_eq!(seen[0].1, seen[2].1);
        assert_ne!(seen[0].1, seen[3].1, "a new note is a new event");
        assert!(
            seen[0].1.starts_with("data."),
            "named after the object: {}",
            seen[0].1
        );

        let stored = stored.lock().unwrap();
        let first = &stored[&seen[0].1];
        assert_eq!(first["series"]["count"], 3);
        assert!(first["series"]["lastObservedTime"].is_string());
        assert_eq!(first["note"], "no CRD", "the patch keeps the rest");
        assert_eq!(first["type"], "Warning");
        assert_eq!(first["reason"], "ProvisioningFailed");
        assert_eq!(first["action"], "Provision");
        assert_eq!(first["reportingController"], "stowage");
        assert_eq!(first["reportingInstance"], "stowage-0");
        assert_eq!(first["regarding"]["uid"], "u1");
        assert_eq!(first["metadata"]["namespace"], "team");
        assert!(first["eventTime"].is_string());
    }

    #[tokio::test]
    async fn a_series_whose_event_was_deleted_starts_a_new_one() {
        let (client, seen, stored) = api_server();
        let recorder = recorder(client);
        recorder
            .publish(&warning("no CRD"), &claim())
            .await
            .unwrap();
        stored.lock().unwrap().clear();
        recorder
            .publish(&warning("no CRD"), &claim())
            .await
            .unwrap();
        recorder
            .publish(&warning("no CRD"), &claim())
            .await
            .unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            calls(&seen),
            [
                ("POST", "no CRD"),
                ("PATCH", "2"),
                ("POST", "no CRD"),
                ("PATCH", "2"),
            ]
        );
        assert_eq!(seen[2].1, seen[3].1, "the new event carries the series on");
    }
}
