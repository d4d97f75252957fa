use super::*;

fn lease(holder: Option<&str>, renewed_secs_ago: i64, duration: i32) -> Lease {
    let now = Timestamp::now();
    Lease {
        metadata: Default::default(),
        spec: Some(LeaseSpec {
            holder_identity: holder.map(String::from),
            lease_duration_seconds: Some(duration),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
            lease_transitions: Some(3),
            ..Default::default()
        }),
    }
}

#[test]
fn no_lease_is_created() {
    assert_eq!(plan(None, "a", Timestamp::now()), LeaseDecision::Create);
}

#[test]
fn own_lease_is_renewed_without_a_transition() {
    let l = lease(Some("a"), 1, 15);
    assert_eq!(
        plan(Some(&l), "a", Timestamp::now()),
        LeaseDecision::Take { transitions: 3 }
    );
}

#[test]
fn live_lease_of_another_is_waited_for() {
    let l = lease(Some("b"), 5, 15);
    assert_eq!(
        plan(Some(&l), "a", Timestamp::now()),
        LeaseDecision::Wait { holder: "b".into() }
    );
}

#[test]
fn expired_lease_is_taken_with_a_transition() {
    let l = lease(Some("b"), 20, 15);
    assert_eq!(
        plan(Some(&l), "a", Timestamp::now()),
        LeaseDecision::Take { transitions: 4 }
    );
}

#[test]
fn released_lease_is_taken() {
    let l = lease(None, 0, 15);
    assert_eq!(
        plan(Some(&l), "a", Timestamp::now()),
        LeaseDecision::Take { transitions: 4 }
    );
}

const RETRY: Duration = Duration::from_secs(2);
const DEADLINE: Duration = Duration::from_secs(10);
const LEASE: Duration = Duration::from_secs(15);

/// A leader whose renewals hang (an API server that accepts the
/// connection and never answers) stops at the renew deadline, well
/// before the lease it last wrote could expire for another replica.
#[tokio::test(start_paused = true)]
async fn a_leader_whose_renewals_hang_stops_before_its_lease_expires() {
    let acquired = Instant::now();
    let attempts = std::cell::Cell::new(0);
    let stop = keep_renewing(
        acquired,
        RETRY,
        DEADLINE,
        || {
            attempts.set(attempts.get() + 1);
            std::future::pending::<Result<bool, String>>()
        },
        |_| panic!("a hanging renewal succeeded"),
    )
    .await;
    assert_eq!(stop, Stop::Deadline);
    assert_eq!(acquired.elapsed(), DEADLINE);
    assert!(acquired.elapsed() < LEASE);
    assert_eq!(attempts.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_counts_from_the_last_renewal_that_landed() {
    let acquired = Instant::now();
    let calls = std::cell::Cell::new(0);
    let renewed = std::cell::RefCell::new(Vec::new());
    let stop = keep_renewing(
        acquired,
        RETRY,
        DEADLINE,
        || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                match n {
                    // Two renewals land, then the API errors, then hangs.
                    1 | 2 => Ok(true),
                    3 | 4 => Err("connection refused".to_string()),
                    _ => std::future::pending().await,
                }
            }
        },
        |at| renewed.borrow_mut().push(at - acquired),
    )
    .await;
    assert_eq!(stop, Stop::Deadline);
    assert_eq!(*renewed.borrow(), [RETRY, RETRY * 2]);
    assert_eq!(acquired.elapsed(), RETRY * 2 + DEADLINE);
}

#[tokio::test(start_paused = true)]
async fn failing_renewals_stop_at_the_deadline_too() {
    let acquired = Instant::now();
    let stop = keep_renewing(
        acquired,
        RETRY,
        DEADLINE,
        || async { Err::<bool, _>("503") },
        |_| {},
    )
    .await;
    assert_eq!(stop, Stop::Deadline);
    assert_eq!(acquired.elapsed(), DEADLINE);
}

#[tokio::test(start_paused = true)]
async fn a_lease_taken_by_another_stops_at_once() {
    let acquired = Instant::now();
    let stop = keep_renewing(
        acquired,
        RETRY,
        DEADLINE,
        || async { Ok::<_, String>(false) },
        |_| {},
    )
    .await;
    assert_eq!(stop, Stop::Taken);
    assert_eq!(acquired.elapsed(), RETRY);
}
