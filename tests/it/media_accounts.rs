//! Media-server logins right after an account change that the gateway's revocation view has
//! not synced yet: the store is the authority, the login catches the view up and is judged on
//! the account as it is now (never a 503 "store unavailable" for a store that answered).

use crate::harness::Gateway;
use crate::jellyfin::{token_of, PW};
use crate::standin::StandIn;

#[tokio::test]
async fn a_media_login_right_after_a_cli_enable_works_at_once() {
    let jf = StandIn::start().await;
    jf.add_user("alice", PW, false);
    // A poll much longer than the test, and a staleness limit above it: only the login's own
    // catch-up can make the enable visible.
    let gw = Gateway::builder(&jf.url())
        .user("alice", PW)
        .store_keys("poll_interval = \"60s\"\nmax_staleness = \"5m\"")
        .route_keys("kind = \"jellyfin\"\nmedia = { }")
        .start()
        .await;
    gw.cli_ok(&["user", "disable", "alice"]);
    gw.cli_ok(&["user", "enable", "alice"]);
    let token = token_of(&gw, "alice", "tv-1").await;
    assert!(!token.is_empty());
    let log = gw.log();
    assert!(
        !log.contains("store operation failed"),
        "the login was refused as if the store were down:\n{log}"
    );
}
