//! The real Jellyfin clients — PyPI `jellyfin-apiclient-python` and npm `@jellyfin/sdk` — through
//! the real gateway in front of the Jellyfin stand-in: discover, log in, call an authenticated
//! endpoint, open the WebSocket, stream with Range; then "sign out of all devices" at the
//! gateway, and the clients' next call is 401, their socket is closed, and the stand-in recorded
//! the upstream `POST /Sessions/Logout` of their token.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{poll_until, Gateway};
use crate::standin::StandIn;
use crate::standin_fidelity::run_client_phases;

const USER: &str = "alice";
const PASSWORD: &str = "alice passphrase for the clients";

async fn setup() -> (StandIn, Gateway, String) {
    let jf = StandIn::start().await;
    let user_id = jf.add_user(USER, PASSWORD, false);
    let gw = Gateway::builder(&jf.url())
        .user(USER, PASSWORD)
        .route_keys("kind = \"jellyfin\"")
        .start()
        .await;
    (jf, gw, user_id)
}

/// Runs a client through the gateway, signing the user out of all devices (CLI) between its
/// phases; checks what the client saw and what reached the stand-in.
async fn run_through_gateway(program: &str, script: &str) {
    let (jf, gw, user_id) = setup().await;
    let jf_ref = &jf;
    let gw_ref = &gw;
    let (p1, p2) = run_client_phases(
        &gw.base,
        USER,
        PASSWORD,
        program,
        script,
        |phase1| async move {
            let token = phase1["token"].as_str().unwrap_or_default().to_string();
            // The token the client holds is bound at the gateway.
            let list = gw_ref.cli_ok(&["session", "list", "--user", USER]);
            assert!(
                list.contains(" media "),
                "{script}: no media session:\n{list}"
            );
            let start = Instant::now();
            gw_ref.cli_ok(&["signout", "--user", USER]);
            assert!(
                gw_ref.refused_media(&token).await,
                "{script}: token still accepted"
            );
            eprintln!(
                "{script}: refused {:?} after the sign-out began",
                start.elapsed()
            );
            assert!(
                poll_until(Duration::from_secs(5), || async {
                    jf_ref.logged_out_tokens().contains(&token)
                })
                .await,
                "{script}: the token was not logged out upstream"
            );
        },
    )
    .await;
    assert_eq!(p1["phase"], 1, "{p1}");
    assert_eq!(p1["user_id"], Value::String(user_id.clone()));
    assert_eq!(p1["me"]["Name"], USER);
    assert_eq!(p1["socket_open"], true, "{p1}");
    assert_eq!(p1["socket_echo"], true, "{p1}");
    assert_eq!(p1["range_status"], 206, "{p1}");
    assert_eq!(p1["range_ok"], true, "{p1}");
    assert_eq!(p2["phase"], 2);
    assert_eq!(p2["me_status"], 401, "{p2}");
    assert_eq!(p2["socket_closed"], true, "{p2}");
    let token = p1["token"].as_str().unwrap().to_string();
    assert_eq!(jf.logged_out_tokens(), vec![token]);
    assert!(jf.live_tokens().is_empty());
}

#[tokio::test]
async fn python_client_through_the_gateway_is_signed_out_everywhere() {
    run_through_gateway("python3", "jf_python.py").await;
}

#[tokio::test]
async fn typescript_sdk_through_the_gateway_is_signed_out_everywhere() {
    run_through_gateway("node", "jf_sdk.mjs").await;
}
