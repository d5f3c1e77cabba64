//! Several gateway replicas on one PostgreSQL: sign-outs reach every replica at once (LISTEN/
//! NOTIFY, with the delta poll as the fallback), and a database outage neither takes the media
//! offline nor loses a revocation.

use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde_json::Value;

use crate::harness::{client, poll_until, Gateway};
use crate::pg::{self, Cluster, Schema};
use crate::upstream::Upstream;

const PW: &str = "correct horse battery staple";
const PUBLIC_URL: &str = "public_url = \"http://media.test\"";

/// Three replicas sharing one store URL and one set of keys; the first creates the users.
async fn replicas(up: &Upstream, url: &str, store: &str) -> Vec<Gateway> {
    // Replicas of one deployment share the public URL (the tokens' audience) and the keys.
    let first = Gateway::builder(&up.url())
        .server_keys(PUBLIC_URL)
        .store_url(url)
        .store_keys(store)
        .user("alice", PW)
        .user("bob", PW)
        .start()
        .await;
    let mut all = vec![];
    for _ in 0..2 {
        all.push(
            Gateway::builder(&up.url())
                .server_keys(PUBLIC_URL)
                .store_url(url)
                .store_keys(store)
                .keys_of(&first)
                .start()
                .await,
        );
    }
    all.insert(0, first);
    all
}

async fn status(gw: &Gateway, token: &str) -> u16 {
    gw.get_status("/probe", token).await
}

#[tokio::test]
async fn a_sign_out_reaches_every_replica_within_a_second() {
    let up = Upstream::start().await;
    let schema = Schema::on(&pg::server_url());
    // A long poll interval: only the push can make the second.
    let gws = replicas(
        &up,
        &schema.url(),
        "poll_interval = \"30s\"\nmax_staleness = \"60s\"",
    )
    .await;
    let alice = gws[0].login("alice", PW).await;
    let bob = gws[1].login("bob", PW).await;
    for gw in &gws {
        assert_eq!(status(gw, &alice.token).await, 200);
        assert_eq!(status(gw, &bob.token).await, 200);
    }

    // Through one replica's account API …
    let start = Instant::now();
    let resp = client()
        .post(gws[0].url("/_portcullis/api/signout-all"))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    for gw in &gws[1..] {
        assert!(
            gw.refused_within(&alice.token, Duration::from_secs(1))
                .await,
            "a replica still accepts alice after {:?}",
            start.elapsed()
        );
    }
    eprintln!("alice refused everywhere after {:?}", start.elapsed());
    for gw in &gws {
        assert_eq!(status(gw, &bob.token).await, 200);
    }

    // … and through the CLI, which is one more writer on the same database.
    let start = Instant::now();
    gws[2].cli_ok(&["signout", "--user", "bob"]);
    let cli_done = start.elapsed();
    for gw in &gws {
        assert!(
            gw.refused_within(&bob.token, Duration::from_secs(1)).await,
            "a replica still accepts bob"
        );
    }
    eprintln!(
        "bob refused everywhere {:?} after the CLI finished",
        start.elapsed() - cli_done
    );

    // Everyone, from one replica, reaches the others too.
    let alice = gws[2].login("alice", PW).await;
    gws[1].cli_ok(&["signout", "--everyone"]);
    for gw in &gws {
        assert!(
            gw.refused_within(&alice.token, Duration::from_secs(1))
                .await
        );
    }
}

#[tokio::test]
async fn replicas_agree_on_every_event_in_order() {
    let up = Upstream::start().await;
    let schema = Schema::on(&pg::server_url());
    let gws = replicas(&up, &schema.url(), "").await;
    // Concurrent revocations through all three replicas at once.
    let mut tokens = Vec::new();
    for i in 0..30 {
        tokens.push(
            gws[i % 3]
                .login(if i % 2 == 0 { "alice" } else { "bob" }, PW)
                .await,
        );
    }
    let revokes = tokens.iter().enumerate().map(|(i, t)| {
        let gw = &gws[(i + 1) % 3];
        async move {
            client()
                .post(gw.url("/_portcullis/logout"))
                .bearer_auth(&t.token)
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    for s in futures_util::future::join_all(revokes).await {
        assert!(s.is_success() || s.is_redirection(), "{s}");
    }
    for gw in &gws {
        for t in &tokens {
            assert!(gw.refused_within(&t.token, Duration::from_secs(2)).await);
        }
    }
    // Every replica's view reached the same sequence number.
    let seqs: Vec<String> = futures_util::future::join_all(gws.iter().map(|gw| async move {
        let text = gw
            .metrics_with(&["portcullis_revocation_view_sequence"])
            .await;
        text.lines()
            .find(|l| l.starts_with("portcullis_revocation_view_sequence "))
            .unwrap()
            .to_string()
    }))
    .await;
    assert!(seqs.windows(2).all(|w| w[0] == w[1]), "{seqs:?}");
}

#[tokio::test]
async fn a_database_outage_keeps_sessions_refuses_changes_and_resyncs_after() {
    let up = Upstream::start().await;
    let cluster = Cluster::start();
    let gw = Gateway::builder(&up.url())
        .store_url(&cluster.url())
        .store_keys("max_staleness = \"2s\"\nbusy_timeout = \"1s\"")
        .user("alice", PW)
        .user("bob", PW)
        .start()
        .await;
    let alice = gw.login("alice", PW).await;
    let bob = gw.login("bob", PW).await;
    let revoked = gw.login("alice", PW).await;
    let resp = client()
        .post(gw.url("/_portcullis/logout"))
        .bearer_auth(&revoked.token)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success() || resp.status().is_redirection());
    assert_eq!(status(&gw, &revoked.token).await, 401);

    // Traffic flows the whole time: a client keeps requesting with alice's session.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, url, token) = (stop.clone(), gw.url("/probe"), alice.token.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            // One request every 5 ms, as a steady client would send them.
            let mut pace = tokio::time::interval(Duration::from_millis(5));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                pace.tick().await;
                match client().get(&url).bearer_auth(&token).send().await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        })
    };

    cluster.stop();
    // Sessions keep working from the view; the acknowledged revocation holds.
    assert_eq!(status(&gw, &alice.token).await, 200);
    assert_eq!(status(&gw, &revoked.token).await, 401);
    // Logins and revocations answer 503 with a clear message.
    let (code, body) = gw.try_login("bob", PW, None).await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.to_string().to_lowercase().contains("unavailable"),
        "{body}"
    );
    let resp = client()
        .post(gw.url("/_portcullis/api/signout-all"))
        .bearer_auth(&bob.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let out = gw.cli(&["signout", "--user", "bob"]);
    assert!(!out.status.success());
    // /readyz and the metrics show the staleness.
    assert!(
        poll_until(Duration::from_secs(10), || async {
            let r = client()
                .get(format!("{}/readyz", gw.admin))
                .send()
                .await
                .unwrap();
            let code = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            code == 503 && v["view"] == "stale"
        })
        .await,
        "readyz never reported the stale view"
    );
    let metrics = gw.metrics_with(&["portcullis_sync_errors_total"]).await;
    let lag: f64 = metrics
        .lines()
        .find(|l| l.starts_with("portcullis_sync_lag_seconds "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(lag >= 2.0, "sync lag {lag}");
    // Serving goes on meanwhile (on_stale = serve, the default).
    assert_eq!(status(&gw, &alice.token).await, 200);

    cluster.restart();
    assert!(
        poll_until(Duration::from_secs(20), || async {
            client()
                .get(format!("{}/readyz", gw.admin))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await,
        "the gateway did not resync after the database came back"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.await.unwrap();
    assert!(
        ok > 50 && failed == 0,
        "traffic during the outage: {ok} ok, {failed} failed"
    );
    // Everything acknowledged before the outage is still in force; changes work again.
    assert_eq!(status(&gw, &revoked.token).await, 401);
    assert_eq!(status(&gw, &alice.token).await, 200);
    gw.cli_ok(&["signout", "--user", "bob"]);
    assert!(gw.refused_within(&bob.token, Duration::from_secs(2)).await);
    let (code, _) = gw.try_login("bob", PW, None).await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn on_stale_deny_refuses_while_the_view_is_stale() {
    let up = Upstream::start().await;
    let cluster = Cluster::start();
    let gw = Gateway::builder(&up.url())
        .store_url(&cluster.url())
        .store_keys("max_staleness = \"1s\"\non_stale = \"deny\"\nbusy_timeout = \"1s\"")
        .user("alice", PW)
        .start()
        .await;
    let alice = gw.login("alice", PW).await;
    assert_eq!(status(&gw, &alice.token).await, 200);
    cluster.stop();
    assert!(
        poll_until(Duration::from_secs(10), || async {
            status(&gw, &alice.token).await == 503
        })
        .await,
        "a stale view kept serving under on_stale = deny"
    );
    let resp = client()
        .get(gw.url("/probe"))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("cannot confirm sessions"));
    gw.metrics_with(&["reason=\"view_stale\""]).await;
    cluster.restart();
    assert!(
        poll_until(Duration::from_secs(20), || async {
            status(&gw, &alice.token).await == 200
        })
        .await,
        "still refusing after the database came back"
    );
}

#[tokio::test]
async fn replicas_started_together_migrate_once() {
    let up = Upstream::start().await;
    let schema = Schema::on(&pg::server_url());
    // Three gateways race to create the schema; all come up and agree.
    let url = schema.url();
    let starts = (0..3).map(|_| {
        Gateway::builder(&up.url())
            .store_url(&url)
            .store_keys("poll_interval = \"200ms\"")
            .start()
    });
    let gws = futures_util::future::join_all(starts).await;
    gws[0].add_user("carol", PW, false);
    let carol = gws[0].login("carol", PW).await;
    assert_eq!(status(&gws[0], &carol.token).await, 200);
    schema.sql("SELECT 1 FROM users WHERE name = 'carol'");
}

#[tokio::test]
async fn jellyfin_apps_can_move_between_replicas() {
    use crate::standin::StandIn;
    let jf = StandIn::start().await;
    jf.add_user("bob", PW, false);
    let schema = Schema::on(&pg::server_url());
    let url = schema.url();
    let build = |first: Option<&Gateway>| {
        let mut b = Gateway::builder(&jf.url())
            .server_keys(PUBLIC_URL)
            .store_url(&url)
            .store_keys("poll_interval = \"30s\"\nmax_staleness = \"60s\"")
            .route_keys("kind = \"jellyfin\"");
        match first {
            Some(gw) => b = b.keys_of(gw),
            None => b = b.user("bob", PW),
        }
        b.start()
    };
    let a = build(None).await;
    let b = build(Some(&a)).await;
    let mb = |device: &str, token: Option<&str>| {
        let mut v = format!(
            "MediaBrowser Client=\"Jellyfin Android\", Device=\"Pixel\", DeviceId=\"{device}\", Version=\"2.6.1\""
        );
        if let Some(t) = token {
            v.push_str(&format!(", Token=\"{t}\""));
        }
        v
    };
    // bob's phone signs in through replica A; its token works on B at once.
    let resp = client()
        .post(a.url("/Users/AuthenticateByName"))
        .header("Authorization", mb("phone", None))
        .json(&serde_json::json!({"Username": "bob", "Pw": PW}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let phone: String = resp.json::<Value>().await.unwrap()["AccessToken"]
        .as_str()
        .unwrap()
        .to_string();
    let me_on = |gw: &Gateway, token: String| {
        let req = client()
            .get(gw.url("/Users/Me"))
            .header("X-Emby-Token", token);
        async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
    };
    assert!(
        poll_until(Duration::from_secs(1), || me_on(&b, phone.clone())
            .then(|s| async move { s == 200 }))
        .await
    );

    // Playback info through A; the player's credential-less stream lands on B.
    let item = "0123456789abcdef0123456789abcdef";
    let resp = client()
        .post(a.url(&format!("/Items/{item}/PlaybackInfo")))
        .header("Authorization", mb("phone", Some(&phone)))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let stream = b.url(&format!("/Videos/{item}/stream?Static=true"));
    assert!(
        poll_until(Duration::from_secs(1), || {
            let req = client().get(&stream).header("Range", "bytes=0-9");
            async move { req.send().await.is_ok_and(|r| r.status() == 206) }
        })
        .await,
        "replica B never learned of the grant made through A"
    );

    // A TV asks replica A for a code, bob approves it through replica B, the TV redeems it
    // through A.
    let init: Value = client()
        .post(a.url("/QuickConnect/Initiate"))
        .header("Authorization", mb("tv", None))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (secret, code) = (
        init["Secret"].as_str().unwrap().to_string(),
        init["Code"].as_str().unwrap().to_string(),
    );
    let resp = client()
        .post(b.url(&format!("/QuickConnect/Authorize?code={code}")))
        .header("Authorization", mb("phone", Some(&phone)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client()
        .post(a.url("/Users/AuthenticateWithQuickConnect"))
        .header("Authorization", mb("tv", None))
        .json(&serde_json::json!({"Secret": secret}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "the approval made through B was not known to A"
    );
    let tv = resp.json::<Value>().await.unwrap()["AccessToken"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        poll_until(Duration::from_secs(1), || me_on(&b, tv.clone())
            .then(|s| async move { s == 200 }))
        .await
    );

    // And signing bob out through A ends everything, everywhere, grants included.
    a.cli_ok(&["signout", "--user", "bob"]);
    assert!(
        poll_until(Duration::from_secs(1), || async {
            me_on(&b, tv.clone()).await == 401
                && me_on(&b, phone.clone()).await == 401
                && client()
                    .get(&stream)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 401)
        })
        .await
    );
}
