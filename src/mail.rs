//! Mail: the messages the gateway sends (templates, plain text and HTML, overridable by a
//! deployment) and the SMTP client that sends them (`lettre` over rustls; STARTTLS required,
//! TLS from the first byte, or plain text only to this host). Sending is the outbox worker's
//! (`app::outbox`): nothing on a request's path waits for an SMTP server.

use std::collections::BTreeMap;
use std::path::Path;

use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::config::mail::{valid_address, MailConfig, MailTls, MAX_TEMPLATE_BYTES};

/// A message ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// Why a message was not sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Worth trying again later (the server is down, busy, or answered 4xx).
    #[error("{0}")]
    Transient(String),
    /// Trying again will not help (the server refused the message or the address: 5xx).
    #[error("{0}")]
    Permanent(String),
}

/// A problem with the files `[mail]` names, as (key, problem).
pub type SetupError = (&'static str, String);

pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    templates_dir: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer")
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

impl Mailer {
    /// Reads the password and CA files and prepares the SMTP client (nothing connects yet).
    pub fn new(config: &MailConfig) -> Result<Mailer, SetupError> {
        let from: Mailbox = config
            .from
            .parse()
            .map_err(|e| ("mail.from", format!("`{}`: {e}", config.from)))?;
        let host = config
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.clone())
            .port(config.port)
            .timeout(Some(config.timeout));
        if config.tls != MailTls::None {
            let mut params = TlsParameters::builder(host);
            if let Some(path) = &config.ca_file {
                let pem = std::fs::read(path).map_err(|e| {
                    (
                        "mail.ca_file",
                        format!("cannot read `{}`: {e}", path.display()),
                    )
                })?;
                let cert = Certificate::from_pem(&pem)
                    .map_err(|e| ("mail.ca_file", format!("`{}`: {e}", path.display())))?;
                params = params
                    .certificate_store(CertificateStore::None)
                    .add_root_certificate(cert);
            }
            let params = params
                .build_rustls()
                .map_err(|e| ("mail.ca_file", format!("TLS: {e}")))?;
            builder = builder.tls(match config.tls {
                MailTls::Implicit => Tls::Wrapper(params),
                _ => Tls::Required(params),
            });
        }
        if let Some((user, file)) = &config.credentials {
            let text = std::fs::read_to_string(file).map_err(|e| {
                (
                    "mail.password_file",
                    format!("cannot read `{}`: {e}", file.display()),
                )
            })?;
            let password = text.trim_end_matches(['\r', '\n']).to_string();
            if password.is_empty() {
                return Err((
                    "mail.password_file",
                    format!("`{}` is empty", file.display()),
                ));
            }
            builder = builder.credentials(Credentials::new(user.clone(), password));
        }
        Ok(Mailer {
            transport: builder.build(),
            from,
            templates_dir: config.templates_dir.clone(),
        })
    }

    /// Renders `kind` with `vars` (from the deployment's templates where it has them).
    pub fn render(&self, kind: &str, vars: &BTreeMap<&str, String>) -> Result<Rendered, String> {
        render(self.templates_dir.as_deref(), kind, vars)
    }

    /// Sends one message to `to`.
    pub async fn send(&self, to: &str, message: &Rendered) -> Result<(), SendError> {
        if !valid_address(to) {
            return Err(SendError::Permanent(format!(
                "`{}` is not an address",
                to.escape_debug()
            )));
        }
        let to: Mailbox = to
            .parse()
            .map_err(|e| SendError::Permanent(format!("`{to}`: {e}")))?;
        let email = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(one_line(&message.subject))
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("Auto-Submitted"),
                "auto-generated".to_string(),
            ))
            .multipart(MultiPart::alternative_plain_html(
                message.text.clone(),
                message.html.clone(),
            ))
            .map_err(|e| SendError::Permanent(e.to_string()))?;
        match self.transport.send(email).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(SendError::Permanent(e.to_string())),
            Err(e) => Err(SendError::Transient(e.to_string())),
        }
    }
}

/// A subject on one line: line breaks and other control characters become spaces.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// Text for HTML: `& < > " '` escaped.
fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
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

/// Replaces every `{{name}}` by its value (escaped by `escape`); a name without a value reads
/// as nothing.
fn fill(template: &str, vars: &BTreeMap<&str, String>, escape: fn(&str) -> String) -> String {
    let mut out = String::with_capacity(template.len() + 256);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                let name = after[..end].trim();
                if let Some(v) = vars.get(name) {
                    out.push_str(&escape(v));
                }
                rest = &after[end + 2..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The built-in templates: subject, and the text body (the HTML body is made from it, with
/// its links as links, unless a deployment gives one).
fn builtin(kind: &str) -> Option<(&'static str, &'static str)> {
    Some(match kind {
        "test" => (
            "Portcullis: a test message",
            "This is a test message from the Portcullis gateway at {{gateway}}.\n\n\
             If you can read it, mail works.",
        ),
        "password_reset" => (
            "Reset your password",
            "Hello {{user}},\n\n\
             Someone (we hope you) asked to reset the password of your account at {{gateway}}.\n\
             To choose a new password, open this link within {{ttl}}:\n\n{{link}}\n\n\
             The link works once. If you did not ask for it, ignore this message: your password \
             stays as it is.",
        ),
        "confirm_email" => (
            "Confirm your email address",
            "Hello {{user}},\n\n\
             To use {{address}} for your account at {{gateway}}, open this link within {{ttl}}:\n\n\
             {{link}}\n\n\
             If you did not ask for this, ignore this message.",
        ),
        "email_changed" => (
            "Your email address was changed",
            "Hello {{user}},\n\n\
             The email address of your account at {{gateway}} was changed to {{address}} on \
             {{time}}.\n\n\
             Wasn't you? Sign in at {{account}}, choose \"Sign out of all devices\" and choose a \
             new password, or ask your administrator.",
        ),
        "new_sign_in" => (
            "New sign-in to your account",
            "Hello {{user}},\n\n\
             Your account at {{gateway}} was signed in from a device or network it has not \
             been seen from before:\n\n\
             When:    {{time}}\nAddress: {{ip}}\nDevice:  {{device}}\nHow:     {{how}}\n\n\
             If this was you, there is nothing to do.\n\n\
             Wasn't you? Open this link to sign out every device and choose a new password (you \
             will be asked to confirm first):\n\n{{not_me_link}}",
        ),
        "password_changed" => (
            "Your password was changed",
            "Hello {{user}},\n\nThe password of your account at {{gateway}} was changed on \
             {{time}} from {{ip}}.\n\n\
             Wasn't you? Ask your administrator at once, or use \"Forgot your password?\" on \
             the sign-in page ({{login}}) and sign out connected devices.",
        ),
        "two_factor_enabled" => (
            "Two-factor authentication is on",
            "Hello {{user}},\n\nTwo-factor authentication was turned on for your account at \
             {{gateway}} on {{time}} from {{ip}}.\n\n\
             Wasn't you? Sign in at {{account}}, choose \"Sign out of all devices\" and \
             choose a new password, or ask your administrator.",
        ),
        "two_factor_disabled" => (
            "Two-factor authentication was turned off",
            "Hello {{user}},\n\nTwo-factor authentication was turned off for your account at \
             {{gateway}} on {{time}} from {{ip}}.\n\n\
             Wasn't you? Sign in at {{account}}, choose \"Sign out of all devices\", choose a \
             new password and turn two-factor authentication on again.",
        ),
        "passkey_added" => (
            "A passkey was added to your account",
            "Hello {{user}},\n\nA passkey ({{detail}}) was added to your account at {{gateway}} \
             on {{time}} from {{ip}}.\n\n\
             Wasn't you? Sign in at {{account}}, remove it, choose \"Sign out of all devices\" \
             and choose a new password.",
        ),
        "passkey_removed" => (
            "A passkey was removed from your account",
            "Hello {{user}},\n\nA passkey ({{detail}}) was removed from your account at \
             {{gateway}} on {{time}} from {{ip}}.\n\n\
             Wasn't you? Sign in at {{account}}, choose \"Sign out of all devices\" and choose \
             a new password.",
        ),
        "signed_out_everywhere" => (
            "Every device was signed out of your account",
            "Hello {{user}},\n\nEvery device signed in to your account at {{gateway}} was \
             signed out on {{time}} ({{detail}}).\n\nSign in again at {{login}}.",
        ),
        "account_changed_by_admin" => (
            "An administrator changed your account",
            "Hello {{user}},\n\nAn administrator of {{gateway}} changed your account on \
             {{time}}: {{detail}}.\n\nQuestions? Ask your administrator.",
        ),
        "breach_response" => (
            "Action needed: sign in again and choose a new password",
            "Hello {{user}},\n\n\
             To protect your account at {{gateway}}, every device has been signed out and a new \
             password is required: your administrator started a breach response on {{time}}.\n\n\
             What to do:\n\
             1. Sign in at {{login}} and choose a new password when asked. Do not reuse an old \
             one, and change it wherever else you used it.\n\
             2. Turn on two-factor authentication (a passkey or an authenticator app) at \
             {{account}}.\n\
             3. Sign your apps and TVs in again.\n\n\
             Nobody from {{gateway}} will ever ask you for your password by mail.",
        ),
        _ => return None,
    })
}

/// The HTML form of a text body: escaped, in paragraphs, with the gateway's own URLs (those
/// under `base`) as links; other text that looks like a URL (a passkey's name, say) stays text.
fn html_of_text(text: &str, base: &str) -> String {
    let mut body = String::new();
    for para in text.split("\n\n") {
        let lines: Vec<String> = para
            .lines()
            .map(|line| {
                line.split(' ')
                    .map(|word| {
                        if !base.is_empty() && word.starts_with(base) {
                            let url = html_escape(word);
                            format!("<a href=\"{url}\">{url}</a>")
                        } else {
                            html_escape(word)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        body.push_str(&format!("<p>{}</p>\n", lines.join("<br>\n")));
    }
    format!(
        "<!DOCTYPE html>\n<html><body style=\"font-family: sans-serif; max-width: 40em\">\n\
         {body}</body></html>\n"
    )
}

/// A deployment's template file, if it has one.
fn read_override(dir: Option<&Path>, kind: &str, ext: &str) -> Result<Option<String>, String> {
    let Some(dir) = dir else { return Ok(None) };
    let path = dir.join(format!("{kind}.{ext}"));
    match std::fs::metadata(&path) {
        Err(_) => Ok(None),
        Ok(m) if m.len() > MAX_TEMPLATE_BYTES => Err(format!(
            "`{}` is larger than {MAX_TEMPLATE_BYTES} bytes",
            path.display()
        )),
        Ok(_) => std::fs::read_to_string(&path)
            .map(Some)
            .map_err(|e| format!("`{}`: {e}", path.display())),
    }
}

/// Renders a message of `kind`: the deployment's templates (`KIND.subject`, `KIND.txt`,
/// `KIND.html` in `dir`) where it has them, else the built-in ones. Values are escaped for
/// HTML in the HTML body; a subject is one line.
pub fn render(
    dir: Option<&Path>,
    kind: &str,
    vars: &BTreeMap<&str, String>,
) -> Result<Rendered, String> {
    let (subject, text) = builtin(kind).ok_or_else(|| format!("no message `{kind}`"))?;
    let subject = read_override(dir, kind, "subject")?.unwrap_or_else(|| subject.to_string());
    let text_template = read_override(dir, kind, "txt")?.unwrap_or_else(|| text.to_string());
    let text = fill(&text_template, vars, |v| v.to_string());
    let base = vars.get("gateway").map(String::as_str).unwrap_or("");
    let html = match read_override(dir, kind, "html")? {
        Some(t) => fill(&t, vars, html_escape),
        None => html_of_text(&text, base),
    };
    Ok(Rendered {
        subject: one_line(&fill(&subject, vars, one_line)),
        text,
        html,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&'static str, &str)]) -> BTreeMap<&'static str, String> {
        pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
    }

    #[test]
    fn every_kind_has_a_built_in_template() {
        for kind in crate::config::mail::KINDS {
            assert!(builtin(kind).is_some(), "{kind}");
        }
        assert!(render(None, "nope", &BTreeMap::new()).is_err());
    }

    #[test]
    fn values_are_escaped_in_html_and_kept_on_one_line_in_subjects() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("test.subject"), "Hi {{user}}").unwrap();
        std::fs::write(dir.path().join("test.html"), "<b>{{user}}</b> {{missing}}").unwrap();
        let r = render(
            Some(dir.path()),
            "test",
            &vars(&[
                ("user", "<script>x</script>\r\nBcc: evil@example.org"),
                ("gateway", "https://gw"),
            ]),
        )
        .unwrap();
        assert_eq!(r.subject, "Hi <script>x</script>  Bcc: evil@example.org");
        assert!(!r.subject.contains('\n'));
        assert_eq!(
            r.html,
            "<b>&lt;script&gt;x&lt;/script&gt;\r\nBcc: evil@example.org</b> "
        );
        assert!(
            r.text.contains("https://gw"),
            "the built-in text body: {}",
            r.text
        );
    }

    #[test]
    fn the_built_in_html_links_the_urls_of_the_text() {
        let r = render(
            None,
            "password_reset",
            &vars(&[
                ("user", "alice & bob"),
                (
                    "link",
                    "https://gw.example.org/_portcullis/reset/abc?x=1&y=2",
                ),
                ("gateway", "https://gw.example.org"),
                ("ttl", "1 hour"),
            ]),
        )
        .unwrap();
        assert!(r
            .text
            .contains("https://gw.example.org/_portcullis/reset/abc?x=1&y=2"));
        assert!(r
            .html
            .contains("<a href=\"https://gw.example.org/_portcullis/reset/abc?x=1&amp;y=2\">"));
        assert!(r.html.contains("alice &amp; bob"));
    }
}
