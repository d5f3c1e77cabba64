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

const STYLE: &str =
    "body{font-family:system-ui,sans-serif;background:#f4f4f6;color:#1d1d24;margin:0}\
main{max-width:24rem;margin:4rem auto;background:#fff;padding:2rem;border-radius:.5rem;\
box-shadow:0 1px 4px rgba(0,0,0,.15)}h1{font-size:1.4rem;margin-top:0}label{display:block;\
margin:.8rem 0 .3rem}input[type=text],input[type=password]{width:100%;box-sizing:border-box;\
padding:.5rem;font-size:1rem}button{margin-top:1.2rem;padding:.55rem 1.2rem;font-size:1rem;\
background:#2d4fd6;color:#fff;border:0;border-radius:.3rem;cursor:pointer}\
.error{background:#fde8e8;color:#8a1111;padding:.6rem;border-radius:.3rem}\
.muted{color:#666;font-size:.9rem}";

fn layout(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<meta name=\"referrer\" content=\"no-referrer\">\
<title>{} · Portcullis</title><style>{STYLE}</style></head><body><main>{body}</main></body></html>",
        escape(title)
    ))
}

/// The login form; `rd` is the (already validated) path to return to.
pub fn login(rd: &str, error: Option<&str>) -> Html<String> {
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e)))
        .unwrap_or_default();
    layout(
        "Sign in",
        &format!(
            "<h1>Sign in</h1>{error}\
<form method=\"post\" action=\"/_portcullis/login\">\
<input type=\"hidden\" name=\"rd\" value=\"{}\">\
<label for=\"username\">User name</label>\
<input type=\"text\" id=\"username\" name=\"username\" autocomplete=\"username\" required autofocus>\
<label for=\"password\">Password</label>\
<input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"current-password\" required>\
<button type=\"submit\">Sign in</button></form>",
            escape(rd)
        ),
    )
}

/// The signed-in landing page.
pub fn home(user: &str) -> Html<String> {
    layout(
        "Signed in",
        &format!(
            "<h1>Signed in</h1><p>You are signed in as <strong>{}</strong>.</p>\
<p><a href=\"/\">Continue to the media server</a></p>\
<form method=\"post\" action=\"/_portcullis/logout\"><button type=\"submit\">Sign out</button></form>",
            escape(user)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped() {
        let page = login("/\"><script>x</script>", Some("<b>")).0;
        assert!(!page.contains("<script>x"));
        assert!(page.contains("&quot;&gt;&lt;script&gt;"));
        assert!(page.contains("&lt;b&gt;"));
    }
}
