//! Server-rendered HTML for the gateway's own pages: inline CSS, no scripts, no external assets.
//! Every value placed into a page goes through `escape`.

use axum::response::Html;

/// Escapes text for HTML element content and double-quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;background:#f4f4f6;color:#1d1d24;\
margin:0}main{max-width:24rem;margin:4rem auto;background:#fff;padding:2rem;\
border-radius:.5rem;box-shadow:0 1px 4px rgba(0,0,0,.15)}main.wide{max-width:64rem;margin:2rem auto}\
h1{font-size:1.4rem;margin-top:0}h2{font-size:1.1rem;margin:0 0 .6rem}\
label{display:block;margin:.8rem 0 .3rem}label.check{display:flex;gap:.5rem;align-items:center}\
input[type=text],input[type=password]{width:100%;box-sizing:border-box;padding:.5rem;\
font-size:1rem}main.wide form.narrow{max-width:24rem}\
button{margin-top:1.2rem;padding:.55rem 1.2rem;font-size:1rem;background:#2d4fd6;color:#fff;\
border:0;border-radius:.3rem;cursor:pointer}button.danger{background:#b3261e}\
button.secondary{background:#5b5f6b}\
.error{background:#fde8e8;color:#8a1111;padding:.6rem;border-radius:.3rem}\
.notice{background:#e6f4ea;color:#14532d;padding:.6rem;border-radius:.3rem}\
.muted{color:#666;font-size:.85rem}\
nav{display:flex;gap:1.2rem;margin-bottom:1.2rem;font-size:.95rem}\
section{margin-top:2rem;padding-top:1rem;border-top:1px solid #e3e3ea}\
table{border-collapse:collapse;width:100%;font-size:.9rem}\
th,td{text-align:left;padding:.5rem .45rem;border-bottom:1px solid #e3e3ea;vertical-align:middle}\
th{color:#555;font-weight:600}td.when{white-space:nowrap}td form{display:inline}\
td button,.actions button{margin-top:0;padding:.3rem .7rem;font-size:.85rem}\
.actions{display:flex;gap:.6rem;flex-wrap:wrap;margin-top:1rem}.actions form{display:inline}\
tr.current{background:#eef3ff}\
.tag{display:inline-block;font-size:.72rem;background:#2d4fd6;color:#fff;padding:.1rem .4rem;\
border-radius:.2rem;margin-left:.4rem;vertical-align:middle}\
code{font-size:1.05rem;word-break:break-all;font-family:ui-monospace,monospace}\
.key{letter-spacing:.08em;background:#f4f4f6;padding:.2rem .4rem;border-radius:.2rem}\
.codes{columns:2;font-family:ui-monospace,monospace;font-size:1.05rem}\
.qr svg{width:200px;height:200px}\
a.sso{display:block;text-align:center;margin:.6rem 0;padding:.55rem 1.2rem;background:#1d1d24;\
color:#fff;border-radius:.3rem;text-decoration:none}p.or{text-align:center}";

/// A plain page of the gateway's (narrow layout) with `body` as its content.
pub(crate) fn page_of(title: &str, body: &str) -> Html<String> {
    layout(title, body)
}

fn layout(title: &str, body: &str) -> Html<String> {
    page(title, body, false)
}

fn page(title: &str, body: &str, wide: bool) -> Html<String> {
    let main = if wide {
        "<main class=\"wide\">"
    } else {
        "<main>"
    };
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<meta name=\"referrer\" content=\"same-origin\">\
<title>{} · Portcullis</title><style>{STYLE}</style></head><body>{main}{body}</main></body></html>",
        escape(title)
    ))
}

/// The login form; `rd` is the (already validated) path to return to. `sso` lists the single
/// sign-on providers (id, display name), shown as buttons above the password form, which
/// `password_form = false` leaves out.
pub fn login(
    rd: &str,
    error: Option<&str>,
    sso: &[(String, String)],
    password_form: bool,
    forgot: bool,
) -> Html<String> {
    let forgot = if forgot {
        "<p class=\"muted\"><a href=\"/_portcullis/forgot\">Forgot your password?</a></p>"
    } else {
        ""
    };
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e)))
        .unwrap_or_default();
    let rd_q = percent_encoding::utf8_percent_encode(rd, percent_encoding::NON_ALPHANUMERIC);
    let buttons: String = sso
        .iter()
        .map(|(id, name)| {
            format!(
                "<a class=\"sso\" data-provider=\"{}\" href=\"/_portcullis/oidc/{}/start?rd={rd_q}\">Sign in with {}</a>",
                escape(id),
                escape(id),
                escape(name)
            )
        })
        .collect();
    let or = if !sso.is_empty() && password_form {
        "<p class=\"muted or\">or with your Portcullis password</p>"
    } else {
        ""
    };
    if !password_form {
        return layout("Sign in", &format!("<h1>Sign in</h1>{error}{buttons}"));
    }
    layout(
        "Sign in",
        &format!(
            "<h1>Sign in</h1>{error}{buttons}{or}\
<form method=\"post\" action=\"/_portcullis/login\" id=\"login-form\">\
<input type=\"hidden\" name=\"rd\" value=\"{}\">\
<label for=\"username\">User name</label>\
<input type=\"text\" id=\"username\" name=\"username\" autocomplete=\"username webauthn\" required autofocus>\
<label for=\"password\">Password</label>\
<input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"current-password\" required>\
<button type=\"submit\">Sign in</button></form>{forgot}\
{PASSKEY_ERROR}<p class=\"muted or\">or</p>\
<button type=\"button\" id=\"passkey-signin\" class=\"secondary\">Sign in with a passkey</button>\
{PASSKEY_SCRIPT}",
            escape(rd)
        ),
    )
}

/// The form that adds a passkey (the page script runs the ceremony through `{base}/start` and
/// `{base}/finish`): the new passkey's name, then `rest` (hidden fields, what confirms the user,
/// the buttons).
pub(crate) fn passkey_add_form(base: &str, rest: &str) -> String {
    format!(
        "<form class=\"narrow\" id=\"passkey-add\" method=\"post\" action=\"{base}/start\" \
data-start=\"{base}/start\" data-finish=\"{base}/finish\">\
<label for=\"passkey-label\">Name for the new passkey</label>\
<input type=\"text\" id=\"passkey-label\" name=\"label\" maxlength=\"64\" required placeholder=\"Phone\">\
{rest}</form>",
        base = escape(base),
    )
}

/// The page of an administrator's one-time passkey link.
pub fn passkey_link(user: &str, token: &str) -> Html<String> {
    layout(
        "Add a passkey",
        &format!(
            "<h1>Add a passkey</h1><p>This one-time link adds a passkey for <strong>{}</strong>. \
Using it signs out every device of this account; then sign in with the new passkey.</p>\
{}{PASSKEY_ERROR}{PASSKEY_SCRIPT}",
            escape(user),
            passkey_add_form(
                &format!("/_portcullis/passkey-link/{token}"),
                "<button type=\"submit\">Add a passkey</button>"
            ),
        ),
    )
}

/// The step of a sign-in that owes a passkey: the user must sign in with one (required by an
/// administrator, `auth.require_passkey` or a breach response) and has none yet.
pub fn passkey_step(user: &str, rd: &str, csrf: &str, error: Option<&str>) -> Html<String> {
    layout(
        "Add a passkey",
        &format!(
            "<h1>Add a passkey</h1>{}<p><strong>{}</strong> must sign in with a passkey: add one \
now to finish signing in. From then on the password alone no longer signs in.</p>\
{}{PASSKEY_ERROR}{PASSKEY_SCRIPT}",
            error_block(error),
            escape(user),
            passkey_add_form(
                "/_portcullis/login/passkey",
                &format!(
                    "{}{}<button type=\"submit\">Add a passkey and sign in</button>",
                    hidden("rd", rd),
                    hidden("csrf", csrf)
                )
            ),
        ),
    )
}

/// The part of a sensitive change's form with which a user who has a passkey confirms with it
/// instead of the password (and code): an empty `passkey_grant` that the page script fills once
/// the passkey answered (then it sends the form), and the button that asks for the passkey.
/// Empty without a passkey. The page must carry [`PASSKEY_ERROR`] and [`PASSKEY_SCRIPT`].
pub(crate) fn passkey_confirm(has_passkey: bool, label: &str) -> String {
    if !has_passkey {
        return String::new();
    }
    format!(
        "<input type=\"hidden\" name=\"passkey_grant\" value=\"\">\
<button type=\"button\" class=\"secondary\" data-passkey-grant>{}</button>",
        escape(label)
    )
}

/// Where the passkey script writes what went wrong.
pub(crate) const PASSKEY_ERROR: &str =
    "<p id=\"passkey-error\" class=\"error\" role=\"alert\" hidden></p>";
/// The passkey script (the pages' policy allows the gateway's own scripts only).
pub(crate) const PASSKEY_SCRIPT: &str = "<script src=\"/_portcullis/passkey.js\" defer></script>";

fn error_block(error: Option<&str>) -> String {
    error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e)))
        .unwrap_or_default()
}

pub(crate) fn hidden(name: &str, value: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
        escape(name),
        escape(value)
    )
}

/// The second step of a login: the code from the authenticator app or a recovery code (with
/// TOTP on), or one of the user's passkeys (when they have one).
pub fn totp_step(
    rd: &str,
    csrf: &str,
    error: Option<&str>,
    code: bool,
    passkey: bool,
) -> Html<String> {
    let code = if code {
        "<label for=\"code\">Code from your authenticator app</label>\
<input type=\"text\" id=\"code\" name=\"code\" inputmode=\"numeric\" autocomplete=\"one-time-code\" required autofocus>\
<p class=\"muted\">Lost your device? Enter one of your recovery codes instead.</p>\
<button type=\"submit\">Verify</button>"
    } else {
        ""
    };
    let passkey = if passkey {
        format!(
            "<button type=\"button\" id=\"passkey-second-factor\" class=\"secondary\">Use a passkey</button>\
{PASSKEY_ERROR}{PASSKEY_SCRIPT}"
        )
    } else {
        String::new()
    };
    layout(
        "Two-factor authentication",
        &format!(
            "<h1>Two-factor authentication</h1>{}\
<form method=\"post\" action=\"/_portcullis/login/2fa\">{}{}{code}{passkey}</form>",
            error_block(error),
            hidden("rd", rd),
            hidden("csrf", csrf)
        ),
    )
}

/// The forced new-password step of a login.
pub fn password_step(user: &str, rd: &str, csrf: &str, error: Option<&str>) -> Html<String> {
    layout(
        "Choose a new password",
        &format!(
            "<h1>Choose a new password</h1>{}\
<p>A new password is required for <strong>{}</strong> before signing in. Every other device \
will be signed out.</p>\
<form method=\"post\" action=\"/_portcullis/login/password\">{}{}\
<label for=\"new_password\">New password</label>\
<input type=\"password\" id=\"new_password\" name=\"new_password\" autocomplete=\"new-password\" required autofocus>\
<label for=\"confirm\">New password again</label>\
<input type=\"password\" id=\"confirm\" name=\"confirm\" autocomplete=\"new-password\" required>\
<button type=\"submit\">Set password and sign in</button></form>",
            error_block(error),
            escape(user),
            hidden("rd", rd),
            hidden("csrf", csrf)
        ),
    )
}

/// TOTP enrolment: the QR code, the key for manual entry, and the confirming code.
pub fn enroll(
    en: &crate::app::account::Enrollment,
    action: &str,
    rd: &str,
    csrf: &str,
    error: Option<&str>,
    intro: &str,
) -> Html<String> {
    layout(
        "Set up two-factor authentication",
        &format!(
            "<h1>Set up two-factor authentication</h1>{}<p>{}</p>\
<div class=\"qr\" aria-label=\"QR code\">{}</div>\
<p>Or enter this key by hand: <code class=\"key\" id=\"totp-secret\">{}</code></p>\
<form method=\"post\" action=\"{}\">{}{}{}\
<label for=\"code\">Code shown by the app</label>\
<input type=\"text\" id=\"code\" name=\"code\" inputmode=\"numeric\" autocomplete=\"one-time-code\" required autofocus>\
<button type=\"submit\">Turn on two-factor authentication</button></form>",
            error_block(error),
            escape(intro),
            en.qr_svg,
            escape(&en.secret_base32),
            escape(action),
            hidden("enroll", &en.token),
            hidden("rd", rd),
            hidden("csrf", csrf)
        ),
    )
}

/// The recovery codes, shown once after enrolment.
pub fn recovery_codes(codes: &[String], next: &str) -> Html<String> {
    let list: String = codes
        .iter()
        .map(|c| format!("<li>{}</li>", escape(c)))
        .collect();
    layout(
        "Recovery codes",
        &format!(
            "<h1>Two-factor authentication is on</h1>\
<p>Keep these recovery codes somewhere safe. Each works once if you lose your device. \
They are shown only now.</p><ul class=\"codes\" id=\"recovery-codes\">{list}</ul>\
<p><a href=\"{}\">Continue</a></p>",
            escape(next)
        ),
    )
}

/// 2FA status with the form that turns it off.
pub fn twofa_status(
    codes_left: i64,
    csrf: &str,
    error: Option<&str>,
    has_passkey: bool,
) -> Html<String> {
    let with_passkey = passkey_confirm(has_passkey, "Turn off with a passkey instead");
    let script = if has_passkey {
        format!("{PASSKEY_ERROR}{PASSKEY_SCRIPT}")
    } else {
        String::new()
    };
    layout(
        "Two-factor authentication",
        &format!(
            "<h1>Two-factor authentication is on</h1>{}<p>{codes_left} recovery codes left.</p>\
<form method=\"post\" action=\"/_portcullis/account/2fa/disable\">{}\
<label for=\"password\">Password</label>\
<input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"current-password\" required>\
<label for=\"code\">Current code</label>\
<input type=\"text\" id=\"code\" name=\"code\" inputmode=\"numeric\" autocomplete=\"one-time-code\" required>\
<button type=\"submit\" class=\"danger\">Turn off two-factor authentication</button>{with_passkey}</form>{script}\
<p><a href=\"/_portcullis/account\">Back to your account</a></p>",
            error_block(error),
            hidden("csrf", csrf)
        ),
    )
}

/// The reset-link form.
pub fn reset_form(token: &str, error: Option<&str>) -> Html<String> {
    layout(
        "Reset your password",
        &format!(
            "<h1>Reset your password</h1>{}<form method=\"post\" action=\"/_portcullis/reset/{}\">\
<label for=\"new_password\">New password</label>\
<input type=\"password\" id=\"new_password\" name=\"new_password\" autocomplete=\"new-password\" required autofocus>\
<label for=\"confirm\">New password again</label>\
<input type=\"password\" id=\"confirm\" name=\"confirm\" autocomplete=\"new-password\" required>\
<label class=\"check\"><input type=\"checkbox\" id=\"signout\" name=\"signout\" value=\"1\" checked> \
Sign out connected devices (every phone, TV and browser signed in to your account)</label>\
<button type=\"submit\">Set new password</button></form>",
            error_block(error),
            escape(token)
        ),
    )
}

/// A short page with a heading, one paragraph and a link.
pub fn message_with_link(title: &str, text: &str, href: &str, link: &str) -> Html<String> {
    layout(
        title,
        &format!(
            "<h1>{}</h1><p>{}</p><p><a href=\"{}\">{}</a></p>",
            escape(title),
            escape(text),
            escape(href),
            escape(link)
        ),
    )
}

pub(crate) fn when(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute] UTC"
            ))
            .ok()
        })
        .unwrap_or_default()
}

/// A short description of a user agent: the app or browser and the platform.
pub fn device_summary(user_agent: &str) -> String {
    let ua = user_agent;
    if ua.is_empty() {
        return "Unknown device".into();
    }
    let browser = [
        ("Edg/", "Edge"),
        ("Firefox/", "Firefox"),
        ("Chrome/", "Chrome"),
        ("Safari/", "Safari"),
        ("curl/", "curl"),
        ("python", "Python client"),
        ("Jellyfin", "Jellyfin app"),
    ]
    .iter()
    .find(|(needle, _)| ua.contains(needle))
    .map(|(_, name)| *name);
    let platform = [
        ("Android", "Android"),
        ("iPhone", "iPhone"),
        ("iPad", "iPad"),
        ("Windows", "Windows"),
        ("Mac OS X", "macOS"),
        ("Linux", "Linux"),
    ]
    .iter()
    .find(|(needle, _)| ua.contains(needle))
    .map(|(_, name)| *name);
    match (browser, platform) {
        (Some(b), Some(p)) => format!("{b} on {p}"),
        (Some(b), None) => b.to_string(),
        (None, Some(p)) => p.to_string(),
        (None, None) => ua.chars().take(40).collect(),
    }
}

/// What a session's device is called in lists: a media app's own description of itself, else
/// a summary of the browser's user agent.
pub fn session_device(s: &crate::store::SessionRecord) -> String {
    match s.kind {
        crate::store::SessionKind::Media => s.user_agent.clone(),
        _ => device_summary(&s.user_agent),
    }
}

/// The account page's single sign-on section: each provider (id, display name, when it was
/// linked, if it is) with a "Link" or "Unlink" button. Empty without providers.
pub fn sso_section(providers: &[(String, String, Option<i64>)], csrf: &str) -> String {
    if providers.is_empty() {
        return String::new();
    }
    let rows: String = providers
        .iter()
        .map(|(id, name, linked)| {
            let (action, label, state) = match linked {
                Some(ms) => ("unlink", "Unlink", format!("Linked since {}", when(*ms))),
                None => ("link", "Link", "Not linked".to_string()),
            };
            format!(
                "<tr data-provider=\"{}\"><td>{}</td><td>{state}</td><td>\
<form method=\"post\" action=\"/_portcullis/account/oidc/{action}\">{}{}\
<button type=\"submit\" class=\"secondary\">{label}</button></form></td></tr>",
                escape(id),
                escape(name),
                hidden("provider", id),
                hidden("csrf", csrf),
            )
        })
        .collect();
    format!(
        "<section id=\"sso\"><h2>Single sign-on</h2>\
<table><thead><tr><th>Provider</th><th>State</th><th></th></tr></thead><tbody>{rows}</tbody></table></section>"
    )
}

/// The account page.
#[allow(clippy::too_many_arguments)]
pub fn account(
    user: &crate::store::User,
    sessions: &[crate::store::SessionRecord],
    current: crate::store::SessionId,
    csrf: &str,
    notice: Option<&str>,
    error: Option<&str>,
    min_length: usize,
    sso: &str,
    plex: &str,
    passkeys: &str,
    has_passkey: bool,
    email: &str,
) -> Html<String> {
    let with_passkey = passkey_confirm(has_passkey, "Change with a passkey instead");
    let notice = notice
        .map(|n| format!("<p class=\"notice\" role=\"status\">{}</p>", escape(n)))
        .unwrap_or_default();
    let rows: String = sessions
        .iter()
        .rev()
        .map(|s| {
            let is_current = s.id == current;
            format!(
                "<tr{}><td title=\"{}\">{}{}</td><td>{}</td><td>{}</td>\
<td class=\"when\">{}</td><td class=\"when\">{}</td><td><form method=\"post\" action=\"/_portcullis/account/sessions/revoke\">{}{}\
<button type=\"submit\" class=\"secondary\">Sign out</button></form></td></tr>",
                if is_current { " class=\"current\" data-current=\"1\"" } else { "" },
                escape(&s.user_agent),
                escape(&session_device(s)),
                if is_current { "<span class=\"tag\">This device</span>" } else { "" },
                escape(s.kind.as_str()),
                escape(&s.ip),
                when(s.created_ms),
                when(s.last_seen_ms),
                hidden("session", &s.id.to_string()),
                hidden("csrf", csrf),
            )
        })
        .collect();
    let admin_link = if user.is_admin {
        "<a href=\"/_portcullis/admin\">Admin</a>"
    } else {
        ""
    };
    page(
        "Your account",
        &format!(
            "<nav><a href=\"/\">Media</a><a href=\"/_portcullis/account/2fa\">Two-factor authentication</a>{admin_link}</nav>\
<h1>Your account: {}</h1>{notice}{}\
<section id=\"devices\"><h2>Signed-in devices</h2>\
<table><thead><tr><th>Device</th><th>Kind</th><th>IP</th><th>Signed in</th><th>Last seen</th><th></th></tr></thead>\
<tbody>{rows}</tbody></table>\
<div class=\"actions\"><form method=\"post\" action=\"/_portcullis/account/signout-others\">{}\
<button type=\"submit\" class=\"secondary\">Sign out of all other devices</button></form>\
<form method=\"post\" action=\"/_portcullis/account/signout-all\">{}\
<button type=\"submit\" class=\"danger\">Sign out of all devices</button></form></div></section>\
<section id=\"password\"><h2>Change password</h2>\
<form class=\"narrow\" method=\"post\" action=\"/_portcullis/account/password\">{}\
<label for=\"current\">Current password</label>\
<input type=\"password\" id=\"current\" name=\"current\" autocomplete=\"current-password\" required>\
<label for=\"new_password\">New password (at least {min_length} characters)</label>\
<input type=\"password\" id=\"new_password\" name=\"new_password\" autocomplete=\"new-password\" required>\
<label for=\"confirm\">New password again</label>\
<input type=\"password\" id=\"confirm\" name=\"confirm\" autocomplete=\"new-password\" required>\
<label class=\"check\"><input type=\"checkbox\" id=\"signout\" name=\"signout\" value=\"1\" checked> Sign out connected devices</label>\
<button type=\"submit\">Change password</button>{with_passkey}</form></section>\
{email}{sso}{plex}{passkeys}<section><h2>Two-factor authentication</h2><p>{}</p></section>\
<section><form method=\"post\" action=\"/_portcullis/logout\">{}\
<button type=\"submit\" class=\"secondary\">Sign out of this device</button></form></section>",
            escape(&user.name),
            error_block(error),
            hidden("csrf", csrf),
            hidden("csrf", csrf),
            hidden("csrf", csrf),
            if user.totp_enabled {
                "On. <a href=\"/_portcullis/account/2fa\">Manage</a>"
            } else {
                "Off. <a href=\"/_portcullis/account/2fa\">Turn it on</a>"
            },
            hidden("csrf", csrf),
        ),
        true,
    )
}

/// The admin page.
#[allow(clippy::too_many_arguments)]
pub fn admin(
    users: &[crate::store::User],
    groups: &std::collections::HashMap<i64, Vec<String>>,
    sessions: &[crate::store::SessionRecord],
    audit: &[crate::store::AuditEntry],
    plex: &str,
    csrf: &str,
    done: Option<&str>,
    now_ms: i64,
) -> Html<String> {
    let notice = done
        .map(|d| {
            format!(
                "<p class=\"notice\" role=\"status\">Done: {}</p>",
                escape(d)
            )
        })
        .unwrap_or_default();
    let action = |name: &str, action: &str, label: &str| {
        format!(
            "<form method=\"post\" action=\"/_portcullis/admin/users/action\">{}{}{}\
<button type=\"submit\" class=\"secondary\">{}</button></form> ",
            hidden("name", name),
            hidden("action", action),
            hidden("csrf", csrf),
            escape(label)
        )
    };
    let user_rows: String = users
        .iter()
        .map(|u| {
            let locked = u.locked_until_ms.is_some_and(|t| t > now_ms);
            let state = [
                u.directory_dn.is_some().then_some("directory"),
                u.is_admin.then_some("admin"),
                (u.disabled && u.directory_disabled_ms.is_none()).then_some("disabled"),
                u.directory_disabled_ms.is_some().then_some("disabled by the directory"),
                locked.then_some("locked"),
                u.must_reset.then_some("must reset"),
                u.totp_enabled.then_some("2FA"),
                u.passkey_required.then_some("passkey required"),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ");
            format!(
                "<tr data-user=\"{}\"><td>{}</td><td>{}</td><td class=\"groups\">{}</td><td>{}{}{}{}{}{}\
<form method=\"post\" action=\"/_portcullis/admin/users/action\">{}{}\
<input type=\"text\" name=\"group\" aria-label=\"Group\" placeholder=\"Group\" maxlength=\"64\" required>\
<button type=\"submit\" name=\"action\" value=\"group_add\" class=\"secondary\">Add to group</button>\
<button type=\"submit\" name=\"action\" value=\"group_remove\" class=\"secondary\">Remove from group</button></form></td></tr>",
                escape(&u.name),
                escape(&u.name),
                escape(&state),
                escape(&groups.get(&u.id).map(|g| g.join(", ")).unwrap_or_default()),
                if u.disabled {
                    action(&u.name, "enable", "Enable")
                } else {
                    action(&u.name, "disable", "Disable")
                },
                if locked {
                    action(&u.name, "unlock", "Unlock")
                } else {
                    String::new()
                },
                if u.directory_dn.is_none() {
                    action(&u.name, "require_reset", "Require reset")
                        + &action(&u.name, "reset_link", "Reset link")
                } else {
                    String::new()
                },
                action(&u.name, "passkey_link", "Passkey link"),
                if u.passkey_required {
                    action(&u.name, "passkey_optional", "Passkey optional")
                } else {
                    action(&u.name, "require_passkey", "Require passkey")
                },
                action(&u.name, "signout", "Sign out all devices"),
                hidden("name", &u.name),
                hidden("csrf", csrf),
            )
        })
        .collect();
    let session_rows: String = sessions
        .iter()
        .map(|s| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>\
<form method=\"post\" action=\"/_portcullis/admin/sessions/revoke\">{}{}\
<button type=\"submit\" class=\"secondary\">End</button></form></td></tr>",
                escape(&s.user_name),
                escape(&session_device(s)),
                escape(&s.ip),
                when(s.last_seen_ms),
                hidden("session", &s.id.to_string()),
                hidden("csrf", csrf)
            )
        })
        .collect();
    let audit_rows: String = audit
        .iter()
        .map(|a| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                when(a.at_ms),
                escape(&a.event),
                escape(&a.outcome),
                escape(&a.user_name),
                escape(&a.ip),
                escape(&a.detail)
            )
        })
        .collect();
    page(
        "Admin",
        &format!(
            "<nav><a href=\"/_portcullis/account\">Your account</a></nav><h1>Admin</h1>{notice}\
<section id=\"users\"><h2>Users</h2><table><thead><tr><th>Name</th><th>State</th><th>Groups</th><th>Actions</th></tr></thead>\
<tbody>{user_rows}</tbody></table>\
<form method=\"post\" action=\"/_portcullis/admin/users\">{}\
<label for=\"name\">New user name</label><input type=\"text\" id=\"name\" name=\"name\" required>\
<label for=\"password\">Password (leave empty to generate one)</label>\
<input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"new-password\">\
<label><input type=\"checkbox\" name=\"admin\" value=\"1\"> Administrator</label>\
<button type=\"submit\">Add user</button></form></section>\
<section id=\"sessions\"><h2>Live sessions</h2><table><thead><tr><th>User</th><th>Device</th><th>IP</th><th>Last seen</th><th></th></tr></thead>\
<tbody>{session_rows}</tbody></table></section>{plex}\
<section id=\"audit\"><h2>Audit log (latest 100)</h2><table><thead><tr><th>When</th><th>Event</th><th>Outcome</th><th>User</th><th>IP</th><th>Detail</th></tr></thead>\
<tbody>{audit_rows}</tbody></table></section>\
<section id=\"breach\"><h2>Breach response</h2><p>Signs out every session of every user, \
requires every user to choose a new password at next login, and replaces the session signing \
key so copied keys stop working.</p>\
<form method=\"post\" action=\"/_portcullis/admin/breach\">{}\
<label for=\"confirm\">Type <strong>SIGN OUT EVERYONE</strong> to confirm</label>\
<input type=\"text\" id=\"confirm\" name=\"confirm\" required autocomplete=\"off\">\
<label class=\"check\"><input type=\"checkbox\" id=\"require_passkey\" name=\"require_passkey\" value=\"1\"> \
Also require every user to register a passkey at next sign-in and to sign in with it from then on</label>\
<label class=\"check\"><input type=\"checkbox\" id=\"notify\" name=\"notify\" value=\"1\" checked> \
Mail every user with a confirmed address what happened and what to do</label>\
<button type=\"submit\" class=\"danger\">Run breach response</button></form></section>",
            hidden("csrf", csrf),
            hidden("csrf", csrf),
        ),
        true,
    )
}

/// The signed-in landing page; `csrf` is the session's token for the sign-out form.
pub fn home(user: &str, csrf: &str) -> Html<String> {
    layout(
        "Signed in",
        &format!(
            "<h1>Signed in</h1><p>You are signed in as <strong>{}</strong>.</p>\
<p><a href=\"/\">Continue to the media server</a></p>\
<p><a href=\"/_portcullis/account\">Your account and devices</a></p>\
<form method=\"post\" action=\"/_portcullis/logout\">{}<button type=\"submit\">Sign out</button></form>",
            escape(user),
            hidden("csrf", csrf)
        ),
    )
}

/// A short page with a heading and one paragraph.
pub fn message(title: &str, text: &str) -> Html<String> {
    layout(
        title,
        &format!("<h1>{}</h1><p>{}</p>", escape(title), escape(text)),
    )
}

/// What a signed-in admin is told about an upstream that failed.
#[derive(Clone, Debug)]
pub struct FailedUpstream {
    pub route: String,
    pub upstream: String,
    /// What went wrong, in a few words ("nothing answers (connection refused)").
    pub problem: String,
    /// The question to ask next ("is Jellyfin running, and bound to that address?").
    pub hint: String,
}

/// The heading and the friendly sentence of an upstream failure page.
pub fn upstream_failure_text(status: u16) -> (&'static str, &'static str) {
    match status {
        502 => (
            "Bad gateway",
            "The media server behind this gateway is not answering. Try again shortly.",
        ),
        504 => (
            "Gateway timeout",
            "The media server behind this gateway took too long to answer. Try again shortly.",
        ),
        _ => ("Error", "The request could not be completed."),
    }
}

/// The page for a request the upstream could not answer: the friendly message for everyone,
/// and for a signed-in admin (`detail`) which route and address failed and what to check.
pub fn upstream_failed(status: u16, detail: Option<&FailedUpstream>) -> Html<String> {
    let (title, text) = upstream_failure_text(status);
    let admin = detail
        .map(|d| {
            format!(
                "<section class=\"detail\"><h2>For administrators</h2>\
<p>Route <code>{}</code>: {} at <code>{}</code>.</p><p>{}</p>\
<p class=\"muted\">Every route's state: <code>/readyz</code> on the admin listener. \
Only administrators see this part.</p></section>",
                escape(&d.route),
                escape(&d.problem),
                escape(&d.upstream),
                escape(&capitalized(&d.hint))
            )
        })
        .unwrap_or_default();
    layout(
        title,
        &format!(
            "<h1>{}</h1><p class=\"error\" role=\"alert\">{}</p>{admin}",
            escape(title),
            escape(text)
        ),
    )
}

fn capitalized(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped() {
        let sso = [("idp".to_string(), "<i>IdP</i>".to_string())];
        let page = login("/\"><script>x</script>", Some("<b>"), &sso, true, false).0;
        assert!(!page.contains("<script>x"));
        assert!(page.contains("&quot;&gt;&lt;script&gt;"));
        assert!(page.contains("&lt;b&gt;"));
        assert!(page.contains("Sign in with &lt;i&gt;IdP&lt;/i&gt;"));
        assert!(page.contains("href=\"/_portcullis/oidc/idp/start?rd="));
        let hidden = login("/", None, &sso, false, false).0;
        assert!(!hidden.contains("name=\"password\"") && hidden.contains("Sign in with"));
    }

    #[test]
    fn upstream_failure_detail_is_escaped_and_only_where_given() {
        let detail = FailedUpstream {
            route: "<media>".into(),
            upstream: "127.0.0.1:8096".into(),
            problem: "nothing answers".into(),
            hint: "is Jellyfin running?".into(),
        };
        let admin = upstream_failed(502, Some(&detail)).0;
        assert!(admin.contains("<code>&lt;media&gt;</code>") && !admin.contains("<media>"));
        assert!(admin.contains("127.0.0.1:8096") && admin.contains("Is Jellyfin running?"));
        let user = upstream_failed(502, None).0;
        assert!(user.contains("Bad gateway") && !user.contains("127.0.0.1"));
        assert!(user.contains(STYLE));
    }
}
