//! CRI's `AuthConfig` (the kubelet's view of an imagePullSecret) as a registry
//! [`Credential`], and the registry and repository a pulled image name refers to.

use base64::Engine as _;

use zest_api::cri::AuthConfig;
use zest_oci::Reference;
use zest_registry::Credential;

/// The credential an `AuthConfig` carries, or `None` for an empty one (anonymous
/// pull). Precedence follows containerd's CRI plugin: a registry token is used as
/// is, an identity token is exchanged at the token service, else user and password
/// (given directly, or as base64 `user:password` in `auth`). A malformed `auth` is an
/// error that names the field, never the value.
pub fn credential_of(auth: &AuthConfig) -> Result<Option<Credential>, String> {
    if !auth.registry_token.is_empty() {
        return Ok(Some(Credential::RegistryToken(auth.registry_token.clone())));
    }
    let (mut username, mut password) = (auth.username.clone(), auth.password.clone());
    if username.is_empty() && password.is_empty() && !auth.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .map_err(|_| "auth.auth is not valid base64".to_string())?;
        let text =
            String::from_utf8(decoded).map_err(|_| "auth.auth is not UTF-8 text".to_string())?;
        let (u, p) = text
            .split_once(':')
            .ok_or_else(|| "auth.auth does not encode \"username:password\"".to_string())?;
        username = u.to_string();
        password = p.to_string();
    }
    if !auth.identity_token.is_empty() {
        return Ok(Some(Credential::IdentityToken {
            username,
            token: auth.identity_token.clone(),
        }));
    }
    if username.is_empty() && password.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credential::Basic { username, password }))
}

/// `(registry host, repository)` of an image name as CRI passes it (`busybox`,
/// `host:5000/team/app:tag`, `...@sha256:...`).
pub fn repository_of(image: &str) -> Result<(String, String), String> {
    let reference: Reference = image
        .parse()
        .map_err(|e| format!("image {image:?} is not a valid reference: {e}"))?;
    Ok((reference.repository.registry, reference.repository.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_auth_config_form() {
        let basic = |u: &str, p: &str| {
            Some(Credential::Basic {
                username: u.into(),
                password: p.into(),
            })
        };
        let a = AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        };
        assert_eq!(credential_of(&a).unwrap(), basic("u", "p"));
        let a = AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("al:i:ce"),
            ..Default::default()
        };
        assert_eq!(credential_of(&a).unwrap(), basic("al", "i:ce"));
        let a = AuthConfig {
            username: "<token>".into(),
            identity_token: "refresh".into(),
            ..Default::default()
        };
        assert_eq!(
            credential_of(&a).unwrap(),
            Some(Credential::IdentityToken {
                username: "<token>".into(),
                token: "refresh".into()
            })
        );
        let a = AuthConfig {
            username: "u".into(),
            registry_token: "bearer".into(),
            ..Default::default()
        };
        assert_eq!(
            credential_of(&a).unwrap(),
            Some(Credential::RegistryToken("bearer".into()))
        );
        assert_eq!(credential_of(&AuthConfig::default()).unwrap(), None);
        let bad = AuthConfig {
            auth: "!!secret!!".into(),
            ..Default::default()
        };
        let e = credential_of(&bad).unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn image_names() {
        assert_eq!(
            repository_of("127.0.0.1:5000/team/app:v1").unwrap(),
            ("127.0.0.1:5000".into(), "team/app".into())
        );
        assert_eq!(
            repository_of("busybox").unwrap(),
            ("docker.io".into(), "library/busybox".into())
        );
        assert!(repository_of("UPPER/Case").is_err());
    }
}
