// A real OpenID Connect provider for the portal and console tests: panva/oidc-provider
// with its development login form (any password; the login names the account), PKCE
// required, and accounts whose claims the test chooses (email, email_verified; roles
// and groups, which the console maps to its roles, in the profile scope).
//
//   node provider.mjs PORT '{"clients": [...], "accounts": {"login": {"email": ...}}}'
//
// Prints "ready" once it listens on 127.0.0.1:PORT (issuer http://127.0.0.1:PORT).
import Provider from 'oidc-provider';

const port = Number(process.argv[2]);
const { clients, accounts } = JSON.parse(process.argv[3]);

const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients,
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'roles', 'groups'],
  },
  conformIdTokenClaims: false, // the email claims in the ID token, not only at userinfo
  pkce: { methods: ['S256'], required: () => true },
  cookies: { keys: ['sealgate-test-only'] },
  features: { devInteractions: { enabled: true } },
  async findAccount(ctx, id) {
    const claims = accounts[id];
    if (!claims) return undefined;
    return { accountId: id, async claims() { return { sub: id, ...claims }; } };
  },
});

provider.listen(port, '127.0.0.1', () => console.log('ready'));
