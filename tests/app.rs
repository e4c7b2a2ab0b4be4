//! The composition root against a real server: settings that cannot work
//! together are refused before anything starts, a service of another
//! interval than the deployment's refuses to start, and a started app
//! answers at once.

use std::time::Duration;

use headcount_app::settings::{DEFAULT_REVOKED_TTL, SettingsError};
use headcount_app::{App, CheckerSettings, HandlerSettings, Settings};
use headcount_protocol::IntervalClock;
use headcount_runtime::Shutdown;
use test_support::{Login, TestApp};

fn handler_settings(app: &TestApp, interval: Duration) -> Settings {
    let mut buckets = app.bucket_settings();
    buckets.sessions_ttl = IntervalClock::new(interval).dictionary_ttl();
    Settings {
        buckets: Some(buckets),
        handler: Some(HandlerSettings {
            nats: app.nats.login_options(Login::Handler, "test-handler"),
            config: heartbeat_handler::Config {
                interval,
                revoked_ttl: DEFAULT_REVOKED_TTL,
                ..Default::default()
            },
        }),
        ..Settings::default()
    }
}

#[tokio::test]
async fn a_handler_of_another_interval_than_the_deployment_refuses_to_start() {
    // The deployment runs with the harness's interval (3 s): its buckets
    // were made for it.
    let app = TestApp::spawn().await;
    let (_trigger, stop) = Shutdown::new();
    let e = App::build(handler_settings(&app, Duration::from_secs(120)), stop)
        .await
        .expect_err("a 120 s handler next to 3 s dictionaries");
    let text = format!("{e:#}");
    assert!(text.contains("--interval"), "{text}");
    assert!(text.contains("sessions bucket"), "{text}");
    // The deployment is untouched and still answers.
    let r = app.active("acme").await;
    assert_eq!(r.active, 0);
}

#[tokio::test]
async fn settings_that_disagree_are_refused_before_anything_connects() {
    let app = TestApp::spawn().await;
    let mut settings = handler_settings(&app, app.timings.interval);
    settings.checker = Some(CheckerSettings {
        // A port nothing listens on: refusing must come first.
        nats: headcount_runtime::NatsOptions::new("nats://127.0.0.1:1", "nowhere"),
        config: checker::Config {
            interval: app.timings.interval * 2,
            ..Default::default()
        },
    });
    let (_trigger, stop) = Shutdown::new();
    let e = tokio::time::timeout(Duration::from_secs(5), App::build(settings, stop))
        .await
        .expect("refused at once, not after trying to connect")
        .expect_err("handler and checker disagree");
    assert!(
        matches!(
            e.downcast_ref::<SettingsError>(),
            Some(SettingsError::IntervalMismatch { .. })
        ),
        "{e:#}"
    );
}

#[tokio::test]
async fn a_started_app_answers_its_first_request_and_stops_cleanly() {
    let app = TestApp::spawn().await;
    // A second checker started through the same root: once `ready`, its
    // endpoints answer with no probing, and it stops on its own switch.
    let extra = app.start_checker().await;
    assert!(extra.health.is_ready(), "{:?}", extra.health.status());
    let r = app.active("acme").await;
    assert_eq!(r.active, 0);
    extra.stop().await.expect("stops cleanly");
    // The first checker still answers.
    assert_eq!(app.active("acme").await.active, 0);
}

#[tokio::test]
async fn partitions_spread_over_several_sessions_buckets_and_a_service_spread_otherwise_refuses() {
    use futures::StreamExt;
    use headcount_protocol::subjects::kv as keys;
    use headcount_protocol::{Limit, Policy, partition};
    use test_support::{Device, Timings};

    let app = TestApp::spawn_spread(
        Limit::new(10, Policy::EvictOldest).unwrap(),
        Timings::default(),
        3,
    )
    .await;
    let dev = app.nats.fleet_client().await;
    let accounts: Vec<String> = (0..12).map(|i| format!("spread{i}")).collect();
    let devices: Vec<Device> = accounts
        .iter()
        .enumerate()
        .map(|(i, a)| {
            Device::start(
                dev.clone(),
                a,
                "tv",
                &format!("s{i}"),
                Duration::from_millis(100),
                Default::default(),
            )
        })
        .collect();
    for a in &accounts {
        app.wait_count(a, 1).await;
    }
    // Each account's dictionaries are in its partition's bucket, and only
    // there.
    let js = async_nats::jetstream::new(app.client.clone());
    let mut held = vec![Vec::new(); 3];
    for (i, list) in held.iter_mut().enumerate() {
        let store = js
            .get_key_value(keys::sessions_bucket(i as u32))
            .await
            .expect("the bucket was made");
        let mut ks = store.keys().await.unwrap();
        while let Some(k) = ks.next().await {
            let (account, _) = keys::parse_session_dict(&k.unwrap()).expect("a dictionary key");
            list.push(account.as_str().to_owned());
        }
    }
    for a in &accounts {
        let home = keys::sessions_bucket_of(partition::of(a), 3) as usize;
        for (i, list) in held.iter().enumerate() {
            assert_eq!(list.contains(a), i == home, "{a} in bucket {i}: {held:?}");
        }
    }
    assert!(
        held.iter().filter(|l| !l.is_empty()).count() > 1,
        "{held:?}"
    );

    // A handler spread over one bucket would write where no checker reads.
    let mut settings = handler_settings(&app, app.timings.interval);
    if let Some(b) = settings.buckets.as_mut() {
        b.sessions_buckets = 1;
    }
    let (_trigger, stop) = Shutdown::new();
    let e = App::build(settings, stop)
        .await
        .expect_err("one bucket next to three");
    let text = format!("{e:#}");
    assert!(text.contains("--sessions-buckets"), "{text}");
    // And one spread over four finds the fourth missing.
    let mut settings = handler_settings(&app, app.timings.interval);
    if let Some(b) = settings.buckets.as_mut() {
        b.sessions_buckets = 4;
    }
    let (_trigger, stop) = Shutdown::new();
    let e = App::build(settings, stop)
        .await
        .expect_err("four buckets next to three");
    assert!(format!("{e:#}").contains("spread over 3"), "{e:#}");
    for a in &accounts {
        assert_eq!(app.active(a).await.active, 1, "{a}");
    }
    Device::silence_all(devices).await;
}
