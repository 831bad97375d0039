// node-oidc-provider (the npm package oidc-provider, a certified OpenID provider) set up as a
// standard identity provider for the storage service: the client-credentials grant, RS256 JWT
// access tokens (RFC 9068) for the resource `urn:mitwelten:storage` with the audience
// `mitwelten-storage`, and the service's roles as scopes. For tests and trials only: the
// clients and their secrets are fixed here and the signing key lives in memory.
//
//   node devkit/node-oidc/provider.mjs [PORT]      prints "ready <issuer>" once it listens
//
// The issuer is http://127.0.0.1:PORT/ (with its trailing slash, as node-oidc-provider has it).
// Clients (client_secret_basic):
//   mitwelten-storage-cli / cli-secret        may ask for the scopes internal and storage-admin
//   mitwelten-storage-reader / reader-secret  may ask for internal only

import { generateKeyPairSync } from 'node:crypto';
import Provider from 'oidc-provider';

const port = Number(process.argv[2] || 3000);
const issuer = `http://127.0.0.1:${port}/`;
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'mitwelten-test-1', use: 'sig', alg: 'RS256' };

const client = (id, secret, scope) => ({
  client_id: id,
  client_secret: secret,
  grant_types: ['client_credentials'],
  redirect_uris: [],
  response_types: [],
  token_endpoint_auth_method: 'client_secret_basic',
  scope,
});

const provider = new Provider(issuer, {
  clients: [
    client('mitwelten-storage-cli', 'cli-secret', 'internal storage-admin'),
    client('mitwelten-storage-reader', 'reader-secret', 'internal'),
  ],
  jwks: { keys: [signingKey] },
  scopes: ['internal', 'storage-admin'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => 'urn:mitwelten:storage',
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: 'internal storage-admin',
        audience: 'mitwelten-storage',
        accessTokenTTL: 3600,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
});

provider.listen(port, '127.0.0.1', () => {
  console.log(`ready ${issuer}`);
});
