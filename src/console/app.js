// pdledger: the data protection console. One plain script, no framework, no build step.
//
// Safe by construction:
// - every value from the server goes into the page as text (text nodes, textContent), never
//   as HTML: this file has no HTML sink at all, and the CSP's Trusted Types refuse one anyway;
// - no personal data in URLs: lookups send the value in a POST body, the page's own address
//   never changes, downloads are made from memory (Blob);
// - nothing in browser storage but the session token (sessionStorage, gone with the tab);
// - the controls are built from the caller's role, and the server refuses the rest anyway.
(function () {
  'use strict';

  const TOKEN_KEY = 'pdledger.token';

  // ---------------------------------------------------------------------------------------
  // Language: Swedish or English, from the browser, with a switch.

  const STR = {
    sv: {
      title: 'pdledger · dataskyddskonsol',
      other_lang: 'English',
      login: 'Logga in',
      username: 'Användarnamn',
      password: 'Lösenord',
      totp_prompt: 'Ange den sexsiffriga koden från din autentiseringsapp.',
      code: 'Kod',
      verify_code: 'Verifiera',
      bad_credentials: 'Fel användarnamn, lösenord eller kod.',
      rate_limited: 'För många misslyckade försök. Vänta en stund och försök igen.',
      session_ended: 'Sessionen har upphört. Logga in igen.',
      logged_out: 'Du är utloggad.',
      logout: 'Logga ut',
      nav_search: 'Sök',
      nav_register: 'Register',
      nav_audit: 'Granskningslogg',
      nav_verify: 'Verifiering',
      nav_users: 'Användare',
      nav_account: 'Mitt konto',
      role_admin: 'administratör',
      role_staff: 'handläggare',
      role_dpo: 'dataskyddsombud',
      role_auditor: 'granskare',
      role_service: 'tjänst',
      search_title: 'Hitta en kund',
      search_by: 'Sök på',
      key_email: 'E-post',
      key_personal_number: 'Personnummer',
      key_org_number: 'Organisationsnummer',
      value: 'Värde',
      find: 'Sök',
      search_hint: 'Värdet skickas i anropets kropp, aldrig i en adress, och sparas ingenstans.',
      no_match: 'Ingen träff.',
      results: 'Träffar',
      open: 'Öppna',
      back: 'Tillbaka',
      loading: 'Hämtar …',
      card: 'Kundkort',
      subject_id: 'Id',
      kind: 'Kundtyp',
      kind_person: 'Privatperson',
      kind_company: 'Företag',
      name: 'Namn',
      personal_number: 'Personnummer',
      org_number: 'Organisationsnummer',
      contact_person: 'Kontaktperson',
      email: 'E-post',
      phone: 'Telefon',
      address: 'Adress',
      registered_on: 'Registrerad',
      contact_changed_on: 'Kontaktuppgifter ändrade',
      consents: 'Samtycken',
      purpose: 'Ändamål',
      given: 'Givet',
      withdrawn: 'Återkallat',
      channel: 'Kanal',
      changed_on: 'Ändrat',
      notes: 'Anteckningar',
      projects: 'Projekt och ritningar',
      project: 'Projekt',
      title_col: 'Titel',
      property: 'Fastighetsbeteckning',
      site: 'Platsadress',
      opened_on: 'Öppnat',
      drawing: 'Ritning',
      revision: 'Revision',
      revisions: 'Revisioner',
      file: 'Fil',
      invoices: 'Fakturor',
      invoice_number: 'Fakturanummer',
      issued_on: 'Utfärdad',
      due_on: 'Förfaller',
      total: 'Belopp',
      paid_amount: 'Betalt',
      status: 'Status',
      status_paid: 'betald',
      status_unpaid: 'obetald',
      totals: 'Summa',
      invoiced: 'Fakturerat',
      unpaid: 'Obetalt',
      none: 'Inga.',
      restricted_read: 'Behandlingen av kunden är begränsad (art. 18). Kontakta dataskyddsombudet.',
      erased_read: 'Kunden är raderad.',
      rights: 'Den registrerades rättigheter',
      export_json: 'Ladda ner registerutdrag (JSON)',
      export_html: 'Ladda ner registerutdrag (HTML)',
      downloaded: 'Nedladdat: {file} ({bytes} byte)',
      restriction: 'Begränsning av behandling',
      is_restricted: 'Behandlingen är begränsad: handläggare kan inte läsa kunden, och bara rättelser kan läggas till.',
      not_restricted: 'Behandlingen är inte begränsad.',
      restrict: 'Begränsa behandlingen',
      unrestrict: 'Häv begränsningen',
      erase_title: 'Radera kunden',
      erase_warning:
        'Radering förstör kundens nycklar: uppgifterna kan aldrig läsas igen, inte heller ur säkerhetskopior. ' +
        'Det lagen kräver att vi sparar (till exempel fakturor) hålls kvar, spärrat, till lagringstidens slut.',
      reason: 'Skäl (sparas i klartext: inga personuppgifter)',
      confirm: 'Skriv {word} för att bekräfta',
      confirm_word: 'RADERA',
      erase: 'Radera',
      receipt: 'Kvitto på raderingen',
      erased_done: 'Kunden är raderad.',
      history: 'Åtkomsthistorik',
      register_title: 'Registret',
      next_page: 'Nästa sida',
      first_page: 'Första sidan',
      city: 'Ort',
      audit_title: 'Granskningslogg',
      f_subject: 'Registrerad (id)',
      f_actor: 'Användare',
      f_action: 'Händelse',
      f_since: 'Från och med (UTC)',
      f_until: 'Till och med (UTC)',
      any: 'alla',
      filter: 'Filtrera',
      at: 'Tid',
      actor: 'Användare',
      action: 'Händelse',
      subject: 'Registrerad',
      outcome: 'Utfall',
      route: 'Anrop',
      verify_title: 'Verifiering av kedjan',
      verify_run: 'Verifiera hela kedjan',
      verify_ok: 'Kedjan är hel.',
      verify_bad: 'Kedjan är bruten vid position {position}: {reason}',
      records: 'Poster',
      uncommitted: 'Ej bekräftade',
      head: 'Huvud',
      position: 'Position',
      hash: 'Hash',
      users_title: 'Användare',
      role: 'Roll',
      totp: 'Tvåstegsinloggning',
      disabled: 'Avstängd',
      yes: 'ja',
      no: 'nej',
      disable: 'Stäng av',
      create_user: 'Skapa användare',
      create: 'Skapa',
      user_created: 'Användaren {user} är skapad.',
      user_disabled: 'Användaren {user} är avstängd.',
      account_title: 'Mitt konto',
      totp_on: 'Tvåstegsinloggning är aktiverad.',
      totp_off: 'Tvåstegsinloggning är inte aktiverad.',
      enroll: 'Aktivera tvåstegsinloggning',
      scan: 'Skanna QR-koden med din autentiseringsapp, eller skriv in nyckeln för hand. Ange sedan den första koden.',
      secret: 'Nyckel',
      activate: 'Aktivera',
      forbidden: 'Din roll får inte göra detta.',
      gone: 'Kunden är raderad.',
      error: 'Något gick fel: {message}',
      network: 'Servern svarar inte.',
    },
    en: {
      title: 'pdledger · data protection console',
      other_lang: 'Svenska',
      login: 'Log in',
      username: 'Username',
      password: 'Password',
      totp_prompt: 'Enter the six-digit code from your authenticator app.',
      code: 'Code',
      verify_code: 'Verify',
      bad_credentials: 'Wrong username, password or code.',
      rate_limited: 'Too many failed attempts. Wait a while and try again.',
      session_ended: 'Your session has ended. Please log in again.',
      logged_out: 'You are logged out.',
      logout: 'Log out',
      nav_search: 'Search',
      nav_register: 'Register',
      nav_audit: 'Audit trail',
      nav_verify: 'Verification',
      nav_users: 'Users',
      nav_account: 'My account',
      role_admin: 'administrator',
      role_staff: 'staff',
      role_dpo: 'data protection officer',
      role_auditor: 'auditor',
      role_service: 'service',
      search_title: 'Find a customer',
      search_by: 'Search by',
      key_email: 'Email',
      key_personal_number: 'Personal identity number',
      key_org_number: 'Organisation number',
      value: 'Value',
      find: 'Find',
      search_hint: 'The value is sent in the request body, never in an address, and is stored nowhere.',
      no_match: 'No match.',
      results: 'Matches',
      open: 'Open',
      back: 'Back',
      loading: 'Loading …',
      card: 'Customer card',
      subject_id: 'Id',
      kind: 'Customer type',
      kind_person: 'Private person',
      kind_company: 'Company',
      name: 'Name',
      personal_number: 'Personal identity number',
      org_number: 'Organisation number',
      contact_person: 'Contact person',
      email: 'Email',
      phone: 'Phone',
      address: 'Address',
      registered_on: 'Registered',
      contact_changed_on: 'Contact details changed',
      consents: 'Consents',
      purpose: 'Purpose',
      given: 'Given',
      withdrawn: 'Withdrawn',
      channel: 'Channel',
      changed_on: 'Changed',
      notes: 'Notes',
      projects: 'Projects and drawings',
      project: 'Project',
      title_col: 'Title',
      property: 'Property designation',
      site: 'Site address',
      opened_on: 'Opened',
      drawing: 'Drawing',
      revision: 'Revision',
      revisions: 'Revisions',
      file: 'File',
      invoices: 'Invoices',
      invoice_number: 'Invoice number',
      issued_on: 'Issued',
      due_on: 'Due',
      total: 'Amount',
      paid_amount: 'Paid',
      status: 'Status',
      status_paid: 'paid',
      status_unpaid: 'unpaid',
      totals: 'Totals',
      invoiced: 'Invoiced',
      unpaid: 'Unpaid',
      none: 'None.',
      restricted_read: "The customer's processing is restricted (Art. 18). Ask the data protection officer.",
      erased_read: 'The customer has been erased.',
      rights: 'Data subject rights',
      export_json: 'Download the register extract (JSON)',
      export_html: 'Download the register extract (HTML)',
      downloaded: 'Downloaded: {file} ({bytes} bytes)',
      restriction: 'Restriction of processing',
      is_restricted: 'Processing is restricted: staff cannot read the customer, and only corrections may be added.',
      not_restricted: 'Processing is not restricted.',
      restrict: 'Restrict processing',
      unrestrict: 'Lift the restriction',
      erase_title: 'Erase the customer',
      erase_warning:
        "Erasure destroys the customer's keys: the data can never be read again, not even from backups. " +
        'What the law requires us to keep (invoices, for instance) is held, locked, until its retention ends.',
      reason: 'Reason (kept in clear: no personal data)',
      confirm: 'Type {word} to confirm',
      confirm_word: 'ERASE',
      erase: 'Erase',
      receipt: 'Erasure receipt',
      erased_done: 'The customer has been erased.',
      history: 'Access history',
      register_title: 'The register',
      next_page: 'Next page',
      first_page: 'First page',
      city: 'City',
      audit_title: 'Audit trail',
      f_subject: 'Data subject (id)',
      f_actor: 'User',
      f_action: 'Action',
      f_since: 'From (UTC)',
      f_until: 'Up to and including (UTC)',
      any: 'any',
      filter: 'Filter',
      at: 'Time',
      actor: 'User',
      action: 'Action',
      subject: 'Data subject',
      outcome: 'Outcome',
      route: 'Request',
      verify_title: 'Chain verification',
      verify_run: 'Verify the whole chain',
      verify_ok: 'The chain is intact.',
      verify_bad: 'The chain is broken at position {position}: {reason}',
      records: 'Records',
      uncommitted: 'Uncommitted',
      head: 'Head',
      position: 'Position',
      hash: 'Hash',
      users_title: 'Users',
      role: 'Role',
      totp: 'Two-step login',
      disabled: 'Disabled',
      yes: 'yes',
      no: 'no',
      disable: 'Disable',
      create_user: 'Create a user',
      create: 'Create',
      user_created: 'User {user} created.',
      user_disabled: 'User {user} disabled.',
      account_title: 'My account',
      totp_on: 'Two-step login is on.',
      totp_off: 'Two-step login is off.',
      enroll: 'Turn on two-step login',
      scan: 'Scan the QR code with your authenticator app, or type the key by hand. Then enter its first code.',
      secret: 'Key',
      activate: 'Activate',
      forbidden: 'Your role may not do this.',
      gone: 'The customer has been erased.',
      error: 'Something went wrong: {message}',
      network: 'The server does not answer.',
    },
  };

  const AUDIT_ACTIONS = [
    'login', 'login_failed', 'logout', 'append', 'read', 'lookup', 'view', 'export', 'erase', 'restrict',
    'unrestrict', 'user_created', 'user_disabled', 'keys_rotated', 'backup', 'denied', 'subject_created',
    'totp_enrolled', 'totp_activated', 'verify',
  ];
  const ROLES = ['admin', 'staff', 'dpo', 'auditor', 'service'];

  // What each role may do: mirrors the server's permissions, which decide anyway.
  const CAN = {
    read: (r) => r === 'staff' || r === 'dpo',
    rights: (r) => r === 'dpo',
    audit: (r) => r === 'admin' || r === 'dpo' || r === 'auditor',
    verify: (r) => r === 'admin' || r === 'auditor',
    users: (r) => r === 'admin',
  };

  // ---------------------------------------------------------------------------------------
  // State: in memory only, but for the token.

  const S = {
    lang: (navigator.language || 'en').toLowerCase().startsWith('sv') ? 'sv' : 'en',
    token: sessionStorage.getItem(TOKEN_KEY),
    me: null,
    expiry: null,
    screen: 'login',
    notice: null,
    error: null,
    form: {},
    mfaToken: null,
    results: null,
    card: null,
    register: null,
    audit: null,
    verify: null,
    users: null,
    enrolment: null,
  };

  function t(key, vars) {
    let s = STR[S.lang][key];
    if (s === undefined) s = STR.en[key] || key;
    for (const [k, v] of Object.entries(vars || {})) s = s.replace('{' + k + '}', String(v));
    return s;
  }

  // ---------------------------------------------------------------------------------------
  // DOM: elements and text nodes only.

  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else if (k === 'class') el.className = v;
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    add(el, kids);
    return el;
  }

  function add(el, kids) {
    for (const k of kids.flat(Infinity)) {
      if (k === null || k === undefined || k === false) continue;
      el.appendChild(k instanceof Node ? k : document.createTextNode(String(k)));
    }
  }

  // An input bound to S.form, so a re-render keeps what was typed.
  function input(id, attrs) {
    const el = h('input', Object.assign({ id, name: id }, attrs || {}));
    if (S.form[id] !== undefined) el.value = S.form[id];
    el.addEventListener('input', () => {
      S.form[id] = el.value;
    });
    return el;
  }

  function select(id, options, attrs) {
    const el = h('select', Object.assign({ id, name: id }, attrs || {}));
    for (const [value, label] of options) el.appendChild(h('option', { value }, label));
    if (S.form[id] !== undefined) el.value = S.form[id];
    el.addEventListener('change', () => {
      S.form[id] = el.value;
    });
    return el;
  }

  function field(label, control) {
    return h('label', { for: control.id }, label, control);
  }

  // A form handled here: it is never submitted to the server as a form (the CSP allows none).
  function form(attrs, onsubmit, ...kids) {
    const el = h('form', Object.assign({ novalidate: true }, attrs), ...kids);
    el.addEventListener('submit', (e) => {
      e.preventDefault();
      act(onsubmit);
    });
    return el;
  }

  function table(headers, rows, attrs) {
    return h(
      'table',
      attrs || {},
      h('thead', {}, h('tr', {}, headers.map((x) => h('th', {}, x)))),
      h('tbody', {}, rows),
    );
  }

  function dl(pairs) {
    return h(
      'dl',
      { class: 'card' },
      pairs.filter((p) => p[1] !== undefined && p[1] !== null && p[1] !== '').map(([k, v, id]) => [h('dt', {}, k), h('dd', { id }, v)]),
    );
  }

  // ---------------------------------------------------------------------------------------
  // The API: fetch with the bearer token; a 401 ends the session.

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // JSON in and out; with `accept`, the response itself (for downloads).
  async function api(method, path, body, accept) {
    const headers = { accept: accept || 'application/json' };
    if (S.token) headers.authorization = 'Bearer ' + S.token;
    if (body !== undefined) headers['content-type'] = 'application/json';
    let r;
    try {
      r = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
        credentials: 'omit',
        referrerPolicy: 'no-referrer',
      });
    } catch (e) {
      throw new ApiError(0, 'network', t('network'));
    }
    if (!r.ok) {
      let b = {};
      try {
        b = await r.json();
      } catch (e) {
        b = {};
      }
      if (r.status === 401 && S.token && !path.startsWith('/v1/auth/login') && path !== '/v1/auth/totp') {
        endSession('session_ended');
        throw new ApiError(401, 'session_ended', '');
      }
      throw new ApiError(r.status, b.error || 'error', b.message || String(r.status));
    }
    return accept ? r : r.json();
  }

  function errorText(e) {
    if (e.code === 'forbidden') return t('forbidden');
    if (e.code === 'erased') return t('gone');
    if (e.code === 'restricted') return t('restricted_read');
    if (e.code === 'network') return t('network');
    return t('error', { message: e.message || e.code });
  }

  // Runs an action; shows its failure (a session that ended has shown its own message).
  async function act(fn) {
    try {
      S.error = null;
      S.notice = null;
      await fn();
    } catch (e) {
      if (e && e.code === 'session_ended') return;
      S.error = e instanceof ApiError ? errorText(e) : String(e && e.message ? e.message : e);
      render();
    }
  }

  // ---------------------------------------------------------------------------------------
  // Sessions.

  function startSession(token, expiresAt) {
    S.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    armExpiry(expiresAt);
  }

  function armExpiry(expiresAt) {
    if (S.expiry) clearTimeout(S.expiry);
    S.expiry = null;
    const ms = expiresAt ? Date.parse(expiresAt) - Date.now() : NaN;
    if (Number.isFinite(ms)) S.expiry = setTimeout(() => endSession('session_ended'), Math.max(0, Math.min(ms, 2147483000)));
  }

  // Forgets everything: token, caller, every piece of data shown.
  function endSession(noticeKey) {
    sessionStorage.removeItem(TOKEN_KEY);
    if (S.expiry) clearTimeout(S.expiry);
    Object.assign(S, {
      token: null, me: null, expiry: null, screen: 'login', notice: noticeKey, error: null, form: {}, mfaToken: null,
      results: null, card: null, register: null, audit: null, verify: null, users: null, enrolment: null,
    });
    render();
  }

  async function loadMe() {
    S.me = await api('GET', '/v1/auth/me');
  }

  function home() {
    const r = S.me.role;
    if (CAN.read(r)) return 'search';
    if (r === 'admin') return 'users';
    if (CAN.audit(r)) return 'audit';
    return 'account';
  }

  async function afterLogin(session) {
    startSession(session.token, session.expires_at);
    S.form = {};
    S.mfaToken = null;
    S.notice = null;
    await loadMe();
    await go(home());
  }

  async function login() {
    const username = (S.form['login-username'] || '').trim();
    const password = S.form['login-password'] || '';
    S.form['login-password'] = '';
    let r;
    try {
      r = await api('POST', '/v1/auth/login', { username, password });
    } catch (e) {
      throw loginError(e);
    }
    if (r.mfa_required) {
      S.mfaToken = r.mfa_token;
      S.notice = null;
      render();
      const code = document.getElementById('totp-code');
      if (code) code.focus();
      return;
    }
    await afterLogin(r);
  }

  async function loginTotp() {
    const code = (S.form['totp-code'] || '').replace(/\s+/g, '');
    S.form['totp-code'] = '';
    let r;
    try {
      r = await api('POST', '/v1/auth/totp', { mfa_token: S.mfaToken, code });
    } catch (e) {
      if (e.status === 401) S.mfaToken = null;
      throw loginError(e);
    }
    await afterLogin(r);
  }

  function loginError(e) {
    if (e.status === 401) return new Error(t('bad_credentials'));
    if (e.status === 429) return new Error(t('rate_limited'));
    return e;
  }

  async function logout() {
    try {
      await api('POST', '/v1/auth/logout');
    } finally {
      endSession('logged_out');
    }
  }

  // ---------------------------------------------------------------------------------------
  // Navigation: the page's address never changes.

  async function go(screen) {
    S.screen = screen;
    S.error = null;
    if (screen !== 'card') S.notice = null;
    if (screen === 'register') await loadRegister(null, []);
    if (screen === 'audit') await loadAudit(null, []);
    if (screen === 'verify' && !S.verify) S.verify = { head: await api('GET', '/v1/ledger/head'), report: null };
    if (screen === 'users') S.users = (await api('GET', '/v1/users')).users;
    render();
  }

  // ---------------------------------------------------------------------------------------
  // Search and the customer card.

  async function search() {
    const key = S.form['search-key'] || 'email';
    const value = (S.form['search-value'] || '').trim();
    if (!value) return;
    const found = await api('POST', '/v1/subjects/lookup', { [key]: value });
    const results = [];
    for (const subject of found.subjects) {
      let name = null;
      let kind = null;
      let problem = null;
      try {
        const v = await api('GET', '/v1/views/customer/' + encodeURIComponent(subject));
        name = v.data.name;
        kind = v.data.kind;
      } catch (e) {
        if (e.code === 'session_ended') throw e;
        problem = errorText(e);
      }
      results.push({ subject, name, kind, problem });
    }
    S.results = results;
    render();
  }

  async function openCard(subject) {
    S.card = { subject, loading: true, downloads: {} };
    S.screen = 'card';
    S.notice = null;
    S.form['erase-reason'] = '';
    S.form['erase-confirm'] = '';
    render();
    const view = (name) =>
      api('GET', '/v1/views/' + name + '/' + encodeURIComponent(subject)).then(
        (v) => ({ data: v.data }),
        (e) => {
          if (e.code === 'session_ended') throw e;
          return { problem: e };
        },
      );
    const [customer, projects, billing] = await Promise.all([view('customer'), view('projects'), view('billing')]);
    Object.assign(S.card, { customer, projects, billing, loading: false });
    if (CAN.rights(S.me.role)) await loadRights();
    render();
  }

  // The dpo's view of the subject's rights: restriction state and access history, from the
  // audit trail (restrictions are audited in the same commit as they are made).
  async function loadRights() {
    const id = encodeURIComponent(S.card.subject);
    const q = (extra) => api('GET', '/v1/audit?subject=' + id + extra).then((r) => r.entries);
    const [history, restricts, lifts] = await Promise.all([
      q('&limit=50'),
      q('&action=restrict&limit=10'),
      q('&action=unrestrict&limit=10'),
    ]);
    const last = (list) => {
      const ok = list.filter((e) => e.outcome === 'ok');
      return ok.length ? ok[0].position : 0;
    };
    S.card.history = history;
    S.card.restricted = last(restricts) > last(lifts);
  }

  async function download(kind) {
    const c = S.card;
    const accept = kind === 'html' ? 'text/html' : 'application/json';
    const r = await api('GET', '/v1/subjects/' + encodeURIComponent(c.subject) + '/export', undefined, accept);
    const blob = await r.blob();
    // The file is named by the subject's id, which is no personal data.
    const file = 'registerutdrag-' + c.subject + '.' + kind;
    const url = URL.createObjectURL(blob);
    const a = h('a', { href: url, download: file, class: 'hidden' });
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    c.downloads[kind] = { file, bytes: blob.size };
    await loadRights();
    render();
  }

  async function setRestricted(on) {
    await api('POST', '/v1/subjects/' + encodeURIComponent(S.card.subject) + (on ? '/restrict' : '/unrestrict'));
    await loadRights();
    render();
  }

  function confirmOk() {
    const typed = (S.form['erase-confirm'] || '').trim().toUpperCase();
    return (typed === 'RADERA' || typed === 'ERASE') && (S.form['erase-reason'] || '').trim().length > 0;
  }

  async function erase() {
    if (!confirmOk()) return;
    const reason = S.form['erase-reason'].trim();
    const receipt = await api('POST', '/v1/subjects/' + encodeURIComponent(S.card.subject) + '/erase', { reason });
    S.card = { subject: S.card.subject, receipt, downloads: {} };
    S.results = null;
    S.form['erase-reason'] = '';
    S.form['erase-confirm'] = '';
    S.notice = 'erased_done';
    await loadRights();
    render();
  }

  // ---------------------------------------------------------------------------------------
  // Register, audit trail, verification, users, account.

  async function loadRegister(cursor, stack) {
    const q = '/v1/views/customer?limit=20' + (cursor ? '&cursor=' + encodeURIComponent(cursor) : '');
    const page = await api('GET', q);
    S.register = { cursor, stack, items: page.items, next: page.next_cursor };
  }

  // The filters as query parameters: ids, usernames, actions and dates, nothing personal.
  // Dates are UTC days; "until" includes its day (the API's `until` is exclusive).
  function auditQuery() {
    const p = new URLSearchParams();
    for (const k of ['subject', 'actor', 'action', 'since', 'until']) {
      let v = (S.form['audit-' + k] || '').trim();
      if (v && k === 'until' && /^\d{4}-\d{2}-\d{2}$/.test(v)) {
        const d = new Date(v + 'T00:00:00Z');
        d.setUTCDate(d.getUTCDate() + 1);
        v = d.toISOString().slice(0, 10);
      }
      if (v) p.set(k, v);
    }
    return p;
  }

  async function loadAudit(cursor, stack) {
    const p = auditQuery();
    p.set('limit', '50');
    if (cursor) p.set('cursor', String(cursor));
    const page = await api('GET', '/v1/audit?' + p.toString());
    S.audit = { cursor, stack, entries: page.entries, next: page.next_cursor };
  }

  async function runVerify() {
    S.verify = { head: S.verify ? S.verify.head : null, report: null, running: true };
    render();
    const report = await api('GET', '/v1/ledger/verify');
    S.verify = { head: await api('GET', '/v1/ledger/head'), report };
    render();
  }

  async function createUser() {
    const body = {
      username: (S.form['user-name'] || '').trim(),
      password: S.form['user-password'] || '',
      role: S.form['user-role'] || 'staff',
    };
    const r = await api('POST', '/v1/users', body);
    S.form['user-name'] = '';
    S.form['user-password'] = '';
    S.notice = ['user_created', { user: r.username }];
    S.users = (await api('GET', '/v1/users')).users;
    render();
  }

  async function disableUser(name) {
    await api('POST', '/v1/users/' + encodeURIComponent(name) + '/disable');
    S.notice = ['user_disabled', { user: name }];
    S.users = (await api('GET', '/v1/users')).users;
    render();
  }

  async function enroll() {
    const r = await api('POST', '/v1/auth/totp/enroll');
    S.enrolment = { secret: r.secret, uri: r.otpauth_uri };
    render();
  }

  async function activate() {
    const code = (S.form['activate-code'] || '').replace(/\s+/g, '');
    S.form['activate-code'] = '';
    await api('POST', '/v1/auth/totp/activate', { code });
    S.enrolment = null;
    await loadMe();
    S.notice = 'totp_on';
    render();
  }

  // ---------------------------------------------------------------------------------------
  // Rendering: the whole page from the state.

  function render() {
    document.documentElement.lang = S.lang;
    document.title = t('title');
    renderTop();
    renderNav();
    const main = document.getElementById('main');
    const banners = [];
    if (S.error) banners.push(h('div', { class: 'banner error', role: 'alert', id: 'error' }, S.error));
    if (S.notice) {
      const [key, vars] = Array.isArray(S.notice) ? S.notice : [S.notice, {}];
      banners.push(h('div', { class: 'banner notice', role: 'status', id: 'notice' }, t(key, vars)));
    }
    const screens = {
      login: viewLogin,
      search: viewSearch,
      card: viewCard,
      register: viewRegister,
      audit: viewAudit,
      verify: viewVerify,
      users: viewUsers,
      account: viewAccount,
    };
    const screen = S.me || S.screen === 'login' ? S.screen : 'login';
    main.replaceChildren(...banners, screens[screen]());
    main.setAttribute('data-screen', screen);
  }

  function renderTop() {
    const top = document.getElementById('top');
    const kids = [h('h1', {}, t('title'))];
    if (S.me) kids.push(h('span', { class: 'who', id: 'who' }, S.me.username + ' · ' + t('role_' + S.me.role)));
    kids.push(
      h('button', { type: 'button', id: 'lang-switch', class: 'secondary', lang: S.lang === 'sv' ? 'en' : 'sv', onclick: () => {
        S.lang = S.lang === 'sv' ? 'en' : 'sv';
        render();
      } }, t('other_lang')),
    );
    if (S.me) kids.push(h('button', { type: 'button', id: 'logout', class: 'secondary', onclick: () => act(logout) }, t('logout')));
    top.replaceChildren(...kids);
  }

  function renderNav() {
    const nav = document.getElementById('nav');
    if (!S.me) {
      nav.replaceChildren();
      return;
    }
    const r = S.me.role;
    const items = [];
    if (CAN.read(r)) items.push(['search', 'nav_search'], ['register', 'nav_register']);
    if (CAN.audit(r)) items.push(['audit', 'nav_audit']);
    if (CAN.verify(r)) items.push(['verify', 'nav_verify']);
    if (CAN.users(r)) items.push(['users', 'nav_users']);
    items.push(['account', 'nav_account']);
    const current = S.screen === 'card' ? 'search' : S.screen;
    nav.replaceChildren(
      ...items.map(([screen, label]) =>
        h('button', { type: 'button', id: 'nav-' + screen, class: screen === current ? 'current' : null, onclick: () => act(() => go(screen)) }, t(label)),
      ),
    );
  }

  function viewLogin() {
    if (S.mfaToken) {
      return h(
        'section',
        { class: 'panel login' },
        h('h2', {}, t('login')),
        h('p', {}, t('totp_prompt')),
        form(
          { class: 'stack', id: 'totp-form' },
          loginTotp,
          field(t('code'), input('totp-code', { inputmode: 'numeric', autocomplete: 'one-time-code', maxlength: 6 })),
          h('button', { type: 'submit', id: 'totp-submit' }, t('verify_code')),
          h('button', { type: 'button', class: 'secondary', id: 'totp-cancel', onclick: () => {
            S.mfaToken = null;
            render();
          } }, t('back')),
        ),
      );
    }
    return h(
      'section',
      { class: 'panel login' },
      h('h2', {}, t('login')),
      form(
        { class: 'stack', id: 'login-form' },
        login,
        field(t('username'), input('login-username', { autocomplete: 'username', autocapitalize: 'none', spellcheck: 'false' })),
        field(t('password'), input('login-password', { type: 'password', autocomplete: 'current-password' })),
        h('button', { type: 'submit', id: 'login-submit' }, t('login')),
      ),
    );
  }

  function viewSearch() {
    const keys = [['email', t('key_email')], ['personal_number', t('key_personal_number')], ['org_number', t('key_org_number')]];
    const results = [];
    if (S.results && S.results.length === 0) results.push(h('p', { id: 'search-none' }, t('no_match')));
    if (S.results && S.results.length) {
      results.push(
        h('h3', {}, t('results')),
        table(
          [t('name'), t('kind'), t('subject_id'), ''],
          S.results.map((r) =>
            h(
              'tr',
              { class: 'result' },
              h('td', { class: 'result-name' }, r.name !== null ? r.name : r.problem),
              h('td', {}, r.kind ? t('kind_' + r.kind) : ''),
              h('td', { class: 'mono' }, r.subject),
              h('td', {}, h('button', { type: 'button', class: 'result-open', onclick: () => act(() => openCard(r.subject)) }, t('open'))),
            ),
          ),
          { id: 'search-results' },
        ),
      );
    }
    return h(
      'section',
      { class: 'panel' },
      h('h2', {}, t('search_title')),
      form(
        { id: 'search-form' },
        search,
        field(t('search_by'), select('search-key', keys)),
        field(t('value'), input('search-value', { type: 'search', autocomplete: 'off', spellcheck: 'false' })),
        h('button', { type: 'submit', id: 'search-submit' }, t('find')),
      ),
      h('p', { class: 'muted' }, t('search_hint')),
      results,
    );
  }

  function money(ore, currency) {
    if (typeof ore !== 'number') return '';
    const locale = S.lang === 'sv' ? 'sv-SE' : 'en-GB';
    try {
      return (ore / 100).toLocaleString(locale, { style: 'currency', currency: currency || 'SEK' });
    } catch (e) {
      return (ore / 100).toFixed(2) + ' ' + (currency || '');
    }
  }

  function addressText(a) {
    if (!a || typeof a !== 'object') return '';
    return [a.street, [a.postal_code, a.city].filter(Boolean).join(' '), a.country].filter(Boolean).join(', ');
  }

  function problemBanner(p) {
    return h('div', { class: 'banner warn' }, errorText(p));
  }

  function viewCard() {
    const c = S.card;
    const back = h('div', { class: 'row' }, h('button', { type: 'button', class: 'secondary', id: 'card-back', onclick: () => act(() => go('search')) }, t('back')));
    if (!c) return back;
    if (c.loading) return h('div', {}, back, h('p', {}, t('loading')));
    const parts = [back];
    if (c.receipt) {
      parts.push(
        h(
          'section',
          { class: 'panel' },
          h('h2', {}, t('receipt')),
          h('p', { class: 'mono' }, c.subject),
          h('pre', { class: 'receipt', id: 'receipt' }, JSON.stringify(c.receipt, null, 2)),
        ),
      );
      if (c.history) parts.push(historyPanel(c.history));
      return h('div', {}, parts);
    }
    const cust = c.customer || {};
    const d = cust.data || {};
    const card = h('section', { class: 'panel', id: 'card' }, h('h2', {}, t('card')));
    if (cust.problem) {
      card.appendChild(problemBanner(cust.problem));
    } else {
      card.appendChild(h('p', { class: 'cardname', id: 'card-name' }, d.name || ''));
      card.appendChild(
        dl([
          [t('subject_id'), h('span', { class: 'mono' }, c.subject)],
          [t('kind'), d.kind ? t('kind_' + d.kind) : ''],
          [t('personal_number'), d.personal_number, 'card-personal-number'],
          [t('org_number'), d.org_number, 'card-org-number'],
          [t('contact_person'), d.contact_person],
          [t('email'), d.email, 'card-email'],
          [t('phone'), d.phone],
          [t('address'), addressText(d.address)],
          [t('registered_on'), d.registered_on],
          [t('contact_changed_on'), d.contact_changed_on],
        ]),
      );
      const consents = Array.isArray(d.consents) ? d.consents : [];
      card.appendChild(h('h3', {}, t('consents')));
      card.appendChild(
        consents.length
          ? table(
            [t('purpose'), t('status'), t('channel'), t('changed_on')],
            consents.map((x) => h('tr', {}, h('td', {}, x.purpose), h('td', {}, x.given ? t('given') : t('withdrawn')), h('td', {}, x.channel || ''), h('td', {}, x.changed_on || ''))),
          )
          : h('p', { class: 'muted' }, t('none')),
      );
      const notes = Array.isArray(d.notes) ? d.notes : [];
      if (notes.length) {
        card.appendChild(h('h3', {}, t('notes')));
        card.appendChild(h('ul', {}, notes.map((n) => h('li', {}, (n.on ? n.on + ': ' : '') + (n.text || '')))));
      }
    }
    parts.push(card);
    if (CAN.rights(S.me.role)) parts.push(rightsPanel(c));
    parts.push(h('div', { class: 'grid2' }, projectsPanel(c.projects), billingPanel(c.billing)));
    if (c.history) parts.push(historyPanel(c.history));
    return h('div', {}, parts);
  }

  function projectsPanel(p) {
    const panel = h('section', { class: 'panel', id: 'projects' }, h('h2', {}, t('projects')));
    if (!p || p.problem) {
      if (p) panel.appendChild(problemBanner(p.problem));
      return panel;
    }
    const projects = Array.isArray(p.data.projects) ? p.data.projects : [];
    if (!projects.length) panel.appendChild(h('p', { class: 'muted' }, t('none')));
    for (const pr of projects) {
      panel.appendChild(h('h3', {}, (pr.project_id || '') + ' · ' + (pr.title || '')));
      panel.appendChild(
        dl([
          [t('property'), pr.property_designation],
          [t('site'), addressText(pr.site_address)],
          [t('opened_on'), pr.opened_on],
        ]),
      );
      const drawings = Array.isArray(pr.drawings) ? pr.drawings : [];
      if (drawings.length) {
        panel.appendChild(
          table(
            [t('drawing'), t('title_col'), t('revision'), t('file'), t('revisions')],
            drawings.map((dr) =>
              h(
                'tr',
                {},
                h('td', {}, dr.drawing_id || ''),
                h('td', {}, dr.title || ''),
                h('td', {}, dr.revision || ''),
                h('td', { class: 'mono' }, dr.file_name || ''),
                h('td', {}, Array.isArray(dr.revisions) ? dr.revisions.map((r) => r.revision).join(', ') : ''),
              ),
            ),
          ),
        );
      }
    }
    return panel;
  }

  function billingPanel(b) {
    const panel = h('section', { class: 'panel', id: 'billing' }, h('h2', {}, t('invoices')));
    if (!b || b.problem) {
      if (b) panel.appendChild(problemBanner(b.problem));
      return panel;
    }
    const invoices = Array.isArray(b.data.invoices) ? b.data.invoices : [];
    if (!invoices.length) panel.appendChild(h('p', { class: 'muted' }, t('none')));
    else {
      panel.appendChild(
        table(
          [t('invoice_number'), t('issued_on'), t('due_on'), t('total'), t('status')],
          invoices.map((i) =>
            h(
              'tr',
              {},
              h('td', { class: 'mono' }, i.invoice_number || ''),
              h('td', {}, i.issued_on || ''),
              h('td', {}, i.due_on || ''),
              h('td', { class: 'num' }, money(i.total_ore, i.currency)),
              h('td', {}, i.status === 'paid' ? t('status_paid') + (i.paid_on ? ' ' + i.paid_on : '') : t('status_unpaid')),
            ),
          ),
        ),
      );
      const tot = b.data.totals || {};
      panel.appendChild(h('h3', {}, t('totals')));
      panel.appendChild(
        dl([
          [t('invoiced'), money(tot.invoiced_ore)],
          [t('paid_amount'), money(tot.paid_ore)],
          [t('unpaid'), money(tot.unpaid_ore)],
        ]),
      );
    }
    return panel;
  }

  function rightsPanel(c) {
    const downloaded = Object.values(c.downloads).map((x) =>
      h('p', { class: 'status-ok downloaded' }, t('downloaded', { file: x.file, bytes: x.bytes })),
    );
    const eraseButton = h('button', { type: 'submit', id: 'erase-submit', class: 'danger', disabled: !confirmOk() }, t('erase'));
    const reason = input('erase-reason', { maxlength: 200, autocomplete: 'off' });
    const confirm = input('erase-confirm', { autocomplete: 'off', spellcheck: 'false', placeholder: t('confirm_word') });
    const sync = () => {
      eraseButton.disabled = !confirmOk();
    };
    reason.addEventListener('input', sync);
    confirm.addEventListener('input', sync);
    return h(
      'div',
      {},
      h(
        'section',
        { class: 'panel', id: 'rights' },
        h('h2', {}, t('rights')),
        h(
          'div',
          { class: 'row' },
          h('button', { type: 'button', id: 'export-json', onclick: () => act(() => download('json')) }, t('export_json')),
          h('button', { type: 'button', id: 'export-html', onclick: () => act(() => download('html')) }, t('export_html')),
        ),
        h('div', { id: 'export-status' }, downloaded),
        h('h3', {}, t('restriction')),
        h('p', { id: 'restriction-state' }, c.restricted ? t('is_restricted') : t('not_restricted')),
        c.restricted
          ? h('button', { type: 'button', id: 'unrestrict', class: 'secondary', onclick: () => act(() => setRestricted(false)) }, t('unrestrict'))
          : h('button', { type: 'button', id: 'restrict', class: 'secondary', onclick: () => act(() => setRestricted(true)) }, t('restrict')),
      ),
      h(
        'section',
        { class: 'panel danger-zone', id: 'erase' },
        h('h2', {}, t('erase_title')),
        h('p', {}, t('erase_warning')),
        form(
          { id: 'erase-form' },
          erase,
          field(t('reason'), reason),
          field(t('confirm', { word: t('confirm_word') }), confirm),
          eraseButton,
        ),
      ),
    );
  }

  function auditTable(entries, id) {
    return table(
      [t('at'), t('actor'), t('action'), t('subject'), t('outcome'), t('route')],
      entries.map((e) =>
        h(
          'tr',
          { class: 'audit-row' },
          h('td', {}, e.at),
          h('td', { class: 'audit-actor' }, e.actor),
          h('td', { class: 'audit-action' }, e.action),
          h('td', { class: 'mono audit-subject' }, e.subject || ''),
          h('td', {}, e.outcome),
          h('td', { class: 'mono' }, [e.route, e.target].filter(Boolean).join(' ')),
        ),
      ),
      { id },
    );
  }

  function historyPanel(entries) {
    return h(
      'section',
      { class: 'panel', id: 'history' },
      h('h2', {}, t('history')),
      entries.length ? auditTable(entries, 'history-table') : h('p', { class: 'muted' }, t('none')),
    );
  }

  function pager(state, load) {
    return h(
      'div',
      { class: 'row' },
      state.stack.length
        ? h('button', { type: 'button', class: 'secondary', id: 'page-first', onclick: () => act(async () => {
          await load(null, []);
          render();
        }) }, t('first_page'))
        : null,
      state.next
        ? h('button', { type: 'button', id: 'page-next', onclick: () => act(async () => {
          await load(state.next, state.stack.concat([state.cursor]));
          render();
        }) }, t('next_page'))
        : null,
    );
  }

  function viewRegister() {
    const r = S.register;
    return h(
      'section',
      { class: 'panel' },
      h('h2', {}, t('register_title')),
      table(
        [t('name'), t('kind'), t('city'), ''],
        r.items.map((it) =>
          h(
            'tr',
            { class: 'register-row' },
            h('td', {}, (it.data && it.data.name) || ''),
            h('td', {}, it.data && it.data.kind ? t('kind_' + it.data.kind) : ''),
            h('td', {}, (it.data && it.data.address && it.data.address.city) || ''),
            h('td', {}, h('button', { type: 'button', class: 'secondary register-open', onclick: () => act(() => openCard(it.subject)) }, t('open'))),
          ),
        ),
        { id: 'register-table' },
      ),
      pager(r, loadRegister),
    );
  }

  function viewAudit() {
    const a = S.audit;
    const actions = [['', t('any')]].concat(AUDIT_ACTIONS.map((x) => [x, x]));
    return h(
      'section',
      { class: 'panel' },
      h('h2', {}, t('audit_title')),
      form(
        { id: 'audit-form' },
        async () => {
          await loadAudit(null, []);
          render();
        },
        field(t('f_subject'), input('audit-subject', { autocomplete: 'off', spellcheck: 'false', size: 36 })),
        field(t('f_actor'), input('audit-actor', { autocomplete: 'off', spellcheck: 'false' })),
        field(t('f_action'), select('audit-action', actions)),
        field(t('f_since'), input('audit-since', { type: 'date' })),
        field(t('f_until'), input('audit-until', { type: 'date' })),
        h('button', { type: 'submit', id: 'audit-submit' }, t('filter')),
      ),
      a.entries.length ? auditTable(a.entries, 'audit-table') : h('p', { class: 'muted', id: 'audit-none' }, t('none')),
      pager(a, loadAudit),
    );
  }

  function viewVerify() {
    const v = S.verify || {};
    const kids = [h('h2', {}, t('verify_title'))];
    if (v.head) {
      kids.push(
        h('h3', {}, t('head')),
        dl([
          [t('position'), String(v.head.position), 'head-position'],
          [t('hash'), h('span', { class: 'mono' }, v.head.hash), 'head-hash'],
        ]),
      );
    }
    kids.push(h('div', { class: 'row' }, h('button', { type: 'button', id: 'verify-run', disabled: v.running, onclick: () => act(runVerify) }, t('verify_run'))));
    if (v.running) kids.push(h('p', {}, t('loading')));
    if (v.report) {
      const r = v.report;
      kids.push(
        h('p', { id: 'verify-result', class: r.ok ? 'status-ok' : 'status-bad' }, r.ok ? t('verify_ok') : t('verify_bad', { position: r.first_bad_position, reason: r.reason || '' })),
        dl([
          [t('records'), String(r.events)],
          [t('uncommitted'), r.uncommitted ? String(r.uncommitted) : null],
          [t('head'), r.head ? r.head.position + ' · ' + r.head.hash : null, 'verify-head'],
        ]),
      );
    }
    return h('section', { class: 'panel' }, kids);
  }

  function viewUsers() {
    const users = S.users || [];
    return h(
      'div',
      {},
      h(
        'section',
        { class: 'panel' },
        h('h2', {}, t('users_title')),
        table(
          [t('username'), t('role'), t('totp'), t('disabled'), ''],
          users.map((u) =>
            h(
              'tr',
              { class: 'user-row' },
              h('td', {}, u.username),
              h('td', {}, t('role_' + u.role)),
              h('td', {}, u.totp ? t('yes') : t('no')),
              h('td', {}, u.disabled ? t('yes') : t('no')),
              h('td', {}, u.disabled || u.username === S.me.username
                ? null
                : h('button', { type: 'button', class: 'secondary user-disable', 'data-user': u.username, onclick: () => act(() => disableUser(u.username)) }, t('disable'))),
            ),
          ),
          { id: 'users-table' },
        ),
      ),
      h(
        'section',
        { class: 'panel' },
        h('h2', {}, t('create_user')),
        form(
          { id: 'user-form' },
          createUser,
          field(t('username'), input('user-name', { autocomplete: 'off', autocapitalize: 'none', spellcheck: 'false' })),
          field(t('password'), input('user-password', { type: 'password', autocomplete: 'new-password' })),
          field(t('role'), select('user-role', ROLES.map((r) => [r, t('role_' + r)]))),
          h('button', { type: 'submit', id: 'user-submit' }, t('create')),
        ),
      ),
    );
  }

  function viewAccount() {
    const kids = [
      h('h2', {}, t('account_title')),
      dl([
        [t('username'), S.me.username],
        [t('role'), t('role_' + S.me.role)],
      ]),
      h('p', { id: 'totp-state' }, S.me.totp_enabled ? t('totp_on') : t('totp_off')),
    ];
    if (!S.me.totp_enabled && !S.enrolment) {
      kids.push(h('button', { type: 'button', id: 'totp-enroll', onclick: () => act(enroll) }, t('enroll')));
    }
    if (S.enrolment) {
      kids.push(
        h('p', {}, t('scan')),
        h(
          'div',
          { class: 'qr' },
          h('div', { id: 'totp-qr' }, window.PdlQr.svg(S.enrolment.uri, 232)),
          h(
            'div',
            {},
            h('p', {}, t('secret')),
            h('p', { class: 'mono', id: 'totp-secret' }, S.enrolment.secret.replace(/(.{4})/g, '$1 ').trim()),
            form(
              { id: 'activate-form' },
              activate,
              field(t('code'), input('activate-code', { inputmode: 'numeric', autocomplete: 'one-time-code', maxlength: 6 })),
              h('button', { type: 'submit', id: 'activate-submit' }, t('activate')),
            ),
          ),
        ),
      );
    }
    return h('section', { class: 'panel' }, kids);
  }

  // ---------------------------------------------------------------------------------------
  // Start: resume the tab's session if its token still works.

  async function start() {
    render();
    if (!S.token) return;
    try {
      await loadMe();
      await go(home());
    } catch (e) {
      if (e && e.code === 'session_ended') return;
      S.error = e instanceof ApiError ? errorText(e) : String(e);
      render();
    }
  }

  start();
})();
