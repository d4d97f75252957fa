//! Warnings for stages refused for doubt about what a device holds (see
//! `csi::node::StageRefusals`), posted on the volume's claim, where
//! `kubectl describe pvc` shows them beside the provisioning events.

use crate::telemetry::events::Recorder;
use kube::api::ListParams;
use kube::runtime::events::{Event, EventType, Reporter as EventReporter};
use kube::{Api, Client};

use crate::crd::Volume;
use crate::csi::node::StageRefusals;

pub const REASON: &str = "StageRefused";

pub struct ClaimWarnings {
    client: Client,
    recorder: Recorder,
    node: String,
}

impl ClaimWarnings {
    pub fn new(client: Client, node: &str) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            EventReporter {
                controller: "stowage-node".into(),
                instance: Some(node.into()),
            },
        );
        ClaimWarnings {
            client,
            recorder,
            node: node.into(),
        }
    }
}

impl StageRefusals for ClaimWarnings {
    fn refused(&self, volume_id: &str, message: &str) {
        let (client, recorder) = (self.client.clone(), self.recorder.clone());
        let volume = volume_id.to_string();
        let note = format!("node {}: {message}", self.node);
        // The CSI call answers kubelet at once; the event follows.
        tokio::spawn(async move {
            if let Err(e) = warn_claim(&client, &recorder, &volume, note).await {
                tracing::warn!(error = %e, %volume, "posting the refusal event failed");
            }
        });
    }
}

async fn warn_claim(
    client: &Client,
    recorder: &Recorder,
    volume: &str,
    note: String,
) -> Result<(), kube::Error> {
    // A list by name: the agent reads Volumes only through list and watch.
    let found = Api::<Volume>::all(client.clone())
        .list(&ListParams::default().fields(&format!("metadata.name={volume}")))
        .await?;
    let Some(claim) = found.items.first().and_then(|v| v.spec.claim.clone()) else {
        return Ok(());
    };
    let event = Event {
        type_: EventType::Warning,
        reason: REASON.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "StageVolume".into(),
        secondary: None,
    };
    recorder.publish(&event, &claim.object_reference()).await
}
