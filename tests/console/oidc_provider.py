"""A tiny OpenID Connect provider for the console's sign-in test: authorization-code flow with
PKCE, auto-approving one configured user. Real HTTP (``http.server`` on port 0, in a thread).

``/authorize`` remembers the request and redirects straight back with a code; ``/token`` checks
the code, the redirect URI, the client and the PKCE verifier, then answers an ID token (for the
console: ``aud`` = the client id, the request's ``nonce``) and an access token for the broker
(``aud`` = "certbroker", the user's roles and office), both ES256-signed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


@dataclass
class MiniOidcProvider:
    """The provider's state: its key, its user, the codes it issued, what it was asked."""

    client_id: str
    user: Mapping[str, Any]
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    issuer: str = ""
    server: ThreadingHTTPServer | None = None

    def write_public_key(self, path: Path) -> Path:
        path.write_bytes(
            self.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return path

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(dict(claims), self.key, algorithm="ES256")

    def start(self) -> None:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                if url.path != "/authorize" or query.get("client_id") != provider.client_id:
                    self.send_error(400)
                    return
                code = secrets.token_urlsafe(16)
                provider.codes[code] = query
                target = f"{query['redirect_uri']}?" + urllib.parse.urlencode(
                    {"code": code, "state": query["state"]}
                )
                self.send_response(302)
                self.send_header("Location", target)
                self.end_headers()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                provider.token_requests.append(form)
                asked = provider.codes.pop(form.get("code", ""), None)
                digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
                challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
                if (
                    asked is None
                    or form.get("redirect_uri") != asked["redirect_uri"]
                    or form.get("client_id") != provider.client_id
                    or challenge != asked["code_challenge"]
                ):
                    self.send_error(400)
                    return
                now = int(time.time())
                base = {
                    "iss": provider.issuer,
                    "sub": provider.user["sub"],
                    "iat": now,
                    "exp": now + 600,
                }
                body = json.dumps(
                    {
                        "token_type": "Bearer",
                        "expires_in": 600,
                        "id_token": provider.sign(
                            base
                            | {
                                "aud": provider.client_id,
                                "nonce": asked["nonce"],
                                "name": provider.user["name"],
                            }
                        ),
                        "access_token": provider.sign(
                            base
                            | {
                                "aud": "certbroker",
                                "roles": provider.user["roles"],
                                "office": provider.user["office"],
                                "jti": secrets.token_hex(8),
                            }
                        ),
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
