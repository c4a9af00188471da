//! Smoke tests for the RustyVault test-support module: each helper against a real server.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::rvault::RustyVault;

#[tokio::test]
async fn starts_unsealed_with_root_token() {
    let started = Instant::now();
    let vault = RustyVault::start().await;
    eprintln!(
        "RustyVault started in {:?} at {}",
        started.elapsed(),
        vault.addr()
    );

    assert!(vault.addr().starts_with("http://127.0.0.1:"));
    assert!(!vault.root_token().is_empty());
    assert_eq!(vault.seal_status().await["sealed"], false);
    let me = vault
        .lookup_self(vault.root_token())
        .await
        .expect("root token is valid");
    assert_eq!(me["policies"], json!(["root"]));
}

#[tokio::test]
async fn kv1_write_read_overwrite_delete() {
    let vault = RustyVault::start().await;

    assert_eq!(vault.kv1_read("rekey/github").await, None);
    vault
        .kv1_write("rekey/github", json!({"current": "s1", "previous": null}))
        .await;
    assert_eq!(
        vault.kv1_read("rekey/github").await,
        Some(json!({"current": "s1", "previous": null}))
    );
    // A write replaces the whole entry.
    vault
        .kv1_write("rekey/github", json!({"current": "s2"}))
        .await;
    assert_eq!(
        vault.kv1_read("/rekey/github").await,
        Some(json!({"current": "s2"}))
    );
    vault.kv1_delete("rekey/github").await;
    assert_eq!(vault.kv1_read("rekey/github").await, None);
}

#[tokio::test]
async fn sealed_server_answers_503_until_unsealed() {
    let vault = RustyVault::start().await;
    vault.kv1_write("app/hook", json!({"v": 1})).await;

    vault.seal().await;
    let (status, body) = vault
        .call(
            Method::GET,
            "secret/app/hook",
            Some(vault.root_token()),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body, json!({"error": "RustyVault is sealed."}));

    vault.unseal().await;
    assert_eq!(vault.kv1_read("app/hook").await, Some(json!({"v": 1})));
    // Unsealing an unsealed server is a no-op.
    vault.unseal().await;
}

#[tokio::test]
async fn restart_keeps_data_port_and_tokens() {
    let mut vault = RustyVault::start().await;
    let addr = vault.addr();
    vault.kv1_write("persist/me", json!({"k": "v"})).await;
    let token = vault.create_token(&["rekey"], "1h").await;

    vault.stop().await;
    assert!(!vault.is_running());
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    assert!(
        client
            .get(format!("{addr}/v1/sys/init"))
            .send()
            .await
            .is_err(),
        "a stopped server must not answer"
    );

    let started = Instant::now();
    vault.restart().await;
    eprintln!("RustyVault restarted in {:?}", started.elapsed());
    assert_eq!(vault.addr(), addr);
    assert_eq!(vault.kv1_read("persist/me").await, Some(json!({"k": "v"})));
    assert!(
        vault.lookup_self(&token).await.is_some(),
        "token survives a restart"
    );
}

#[tokio::test]
async fn token_create_use_revoke() {
    let vault = RustyVault::start().await;
    let token = vault.create_token(&["rekey"], "1h").await;
    assert_ne!(token, vault.root_token());

    let me = vault.lookup_self(&token).await.expect("new token is valid");
    assert_eq!(me["ttl"], 3600);
    // No ACLs in RustyVault: a "restricted" token can write anywhere.
    let (status, body) = vault
        .call(
            Method::PUT,
            "secret/anything",
            Some(&token),
            Some(json!({"a": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");

    vault.revoke_token(&token).await;
    assert_eq!(vault.lookup_self(&token).await, None);
    let (status, body) = vault
        .call(Method::GET, "secret/anything", Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body, json!({"error": "Permission denied."}));
}

#[tokio::test]
async fn token_expires_after_its_ttl() {
    let vault = RustyVault::start().await;
    let token = vault.create_token(&[], "2s").await;
    assert!(vault.lookup_self(&token).await.is_some());
    let deadline = Instant::now() + Duration::from_secs(10);
    while vault.lookup_self(&token).await.is_some() {
        assert!(Instant::now() < deadline, "token outlived its 2s ttl by 8s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn approle_login_gives_a_working_token() {
    let vault = RustyVault::start().await;
    let (role_id, secret_id) = vault.approle("rekey", &["rekey"], "1h").await;

    let login = json!({"role_id": role_id, "secret_id": secret_id});
    let (status, body) = vault
        .call(Method::POST, "auth/approle/login", None, Some(login))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["auth"]["lease_duration"], 3600);
    let token = body["auth"]["client_token"].as_str().unwrap().to_string();
    vault.kv1_write("rekey/a", json!({"x": "y"})).await;
    let (status, body) = vault
        .call(Method::GET, "secret/rekey/a", Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"], json!({"x": "y"}));

    let bad = json!({"role_id": role_id, "secret_id": "wrong"});
    let (status, body) = vault
        .call(Method::POST, "auth/approle/login", None, Some(bad))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Calling it again reuses the mount and role.
    let (role_id_again, _) = vault.approle("rekey", &["rekey"], "1h").await;
    assert_eq!(role_id_again, role_id);
}

#[tokio::test]
async fn parallel_servers_are_independent() {
    let (a, b) = tokio::join!(RustyVault::start(), RustyVault::start());
    assert_ne!(a.addr(), b.addr());
    a.kv1_write("only/in/a", json!({"v": "a"})).await;
    assert_eq!(b.kv1_read("only/in/a").await, None);
    assert_eq!(a.kv1_read("only/in/a").await, Some(json!({"v": "a"})));
}
