// The dashboard at `/` (SPEC §8), driven in a real headless Chromium (Debian's `chromium`,
// through playwright-core): start a session from the form, watch the grid stream, answer
// the clarification in the page, see COMPLETED; cancel another; drop the server's sockets
// mid-run and see the page resync with every event exactly once; with auth on, the token
// prompt and a refusal in words. The page's first load is measured (compressed bytes).
//
// Screenshots of each view go to docs/screenshots/ with UPDATE_SCREENSHOTS=1, else to a
// temporary directory (so CI does not rewrite committed files).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { spawnHerald } from './helpers.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const SHOTS = process.env.UPDATE_SCREENSHOTS === '1'
  ? path.resolve(HERE, '../../docs/screenshots')
  : fs.mkdtempSync(path.join(os.tmpdir(), 'herald-shots-'));
const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const WAIT = 20000;
const SECRET = 'dashboard-test-secret';

// Two simulated models slow enough that a run streams for a few seconds.
const CONFIG = `
[orchestrator]
update_interval_ms = 50
clarification_timeout_secs = 120

[[models]]
name = "sim-north"
provider = "simulated"
latency_ms = 50
tokens_per_sec = 25

[[models]]
name = "sim-south"
provider = "simulated"
latency_ms = 80
tokens_per_sec = 20
`;

let browser;
before(async () => {
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
});
after(async () => {
  await browser?.close();
});

function writeConfig() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'herald-dash-'));
  const file = path.join(dir, 'herald.toml');
  fs.writeFileSync(file, CONFIG);
  return file;
}

function sign(claims) {
  const b64 = (s) => Buffer.from(s).toString('base64url');
  const body = { sub: 'dash-user', exp: Math.floor(Date.now() / 1000) + 600, ...claims };
  const unsigned = `${b64(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))}.${b64(JSON.stringify(body))}`;
  return `${unsigned}.${createHmac('sha256', SECRET).update(unsigned).digest('base64url')}`;
}

async function history(url, sessionId, headers = {}) {
  const events = [];
  let after = 0;
  for (;;) {
    const r = await fetch(`${url}/api/wizard/session/${sessionId}/events?after=${after}&limit=1000`, { headers });
    assert.equal(r.status, 200);
    const body = await r.json();
    if (body.events.length === 0) return events;
    events.push(...body.events);
    after = body.events.at(-1).seq;
  }
}

/** The seqs the page kept for `sessionId`, in the order it applied them. */
function pageSeqs(page, sessionId) {
  return page.evaluate((id) => window.herald.seqs(id), sessionId);
}

/**
 * Accessibility checks a page can fail: every form control has a label, and every element
 * showing text has a contrast of at least 4.5:1 against the background it sits on.
 * Returns the failures.
 */
function accessibilityFailures(page) {
  return page.evaluate(() => {
    const failures = [];
    for (const control of document.querySelectorAll('input, select, textarea, button')) {
      if (control.offsetParent === null) continue;
      const named = control.labels?.length || control.getAttribute('aria-label') || control.getAttribute('aria-labelledby')
        || (control.tagName === 'BUTTON' && control.textContent.trim());
      if (!named) failures.push(`unlabelled ${control.outerHTML.slice(0, 80)}`);
    }
    const rgb = (c) => (c.match(/[\d.]+/g) || []).map(Number);
    const lum = ([r, g, b]) => {
      const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
      return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
    };
    const background = (el) => {
      for (let e = el; e; e = e.parentElement) {
        const c = rgb(getComputedStyle(e).backgroundColor);
        if (c.length === 3 || (c.length === 4 && c[3] > 0.9)) return c.slice(0, 3);
      }
      return [255, 255, 255];
    };
    for (const el of document.querySelectorAll('body *')) {
      if (el.offsetParent === null || el.children.length > 0 || !el.textContent.trim()) continue;
      const style = getComputedStyle(el);
      if (style.visibility === 'hidden' || el.closest('[disabled]')) continue;
      const fg = rgb(style.color).slice(0, 3);
      const [a, b] = [lum(fg), lum(background(el))].sort((x, y) => y - x);
      const ratio = (a + 0.05) / (b + 0.05);
      if (ratio < 4.5) failures.push(`contrast ${ratio.toFixed(2)} for "${el.textContent.trim().slice(0, 30)}" (${el.tagName.toLowerCase()}.${el.className})`);
    }
    return failures;
  });
}

async function startFromForm(page, prompts) {
  await page.goto(`${page.baseUrl}/#/new`);
  await page.locator('#new-session').waitFor();
  await page.locator('input[name=model]').first().waitFor();
  await page.fill('#prompts', prompts.join('\n'));
  for (const box of await page.locator('input[name=model]').all()) await box.check();
  await page.selectOption('#strategy', 'all');
  await page.fill('#metadata', '{"from": "dashboard test"}');
  await page.click('#new-session button[type=submit]');
  await page.waitForFunction(() => location.hash.startsWith('#/session/'), null, { timeout: WAIT });
  const sessionId = decodeURIComponent((await page.evaluate(() => location.hash)).slice('#/session/'.length));
  await page.locator(`#session-view[data-session-id="${sessionId}"]`).waitFor();
  return sessionId;
}

test('the dashboard starts, streams, answers, resyncs after a drop and cancels, in a real browser', async () => {
  const server = await spawnHerald(['--config', writeConfig(), '--max-answer-bytes', '64']);
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await context.newPage();
  page.baseUrl = server.url;
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  try {
    // The first load, compressed, as the browser fetched it.
    const measured = [];
    page.on('requestfinished', (request) => {
      measured.push(request.sizes().then((s) => ({ url: request.url(), bytes: s.responseBodySize + s.responseHeadersSize })));
    });
    await page.goto(`${server.url}/`);
    await page.locator('#sessions-view').waitFor();
    await page.locator('#conn[data-state=connected]').waitFor({ timeout: WAIT });
    const sizes = await Promise.all(measured.splice(0));
    const firstLoad = sizes.reduce((n, s) => n + s.bytes, 0);
    console.log(`first load: ${sizes.length} requests, ${firstLoad} bytes compressed`);
    assert.ok(sizes.some((s) => s.url.endsWith('/socket.io/socket.io.min.js')), JSON.stringify(sizes));
    assert.ok(firstLoad < 150 * 1024, `first load ${firstLoad} bytes`);

    // Start a session from the form; one prompt asks for a clarification.
    const sessionId = await startFromForm(page, ['Summarise the quarterly report [clarify]', 'List three risks']);

    // The grid streams: a cell shows a partial output while its model is still processing.
    await page.waitForFunction(() => [...document.querySelectorAll('#grid td[data-status=processing] .output')]
      .some((o) => o.textContent.length > 0), null, { timeout: WAIT });

    // Drop the page's socket mid-run (as a network failure would); it reconnects,
    // resubscribes with lastSeq and says so.
    const resyncsBefore = await page.evaluate(() => window.herald.resyncs);
    const dropped = await fetch(`${server.url}/api/dev/session/${sessionId}/drop-sockets`, { method: 'POST' });
    assert.equal(dropped.status, 200);
    assert.ok((await dropped.json()).dropped >= 1, 'the page followed the session');
    await page.waitForFunction((n) => window.herald.resyncs > n, resyncsBefore, { timeout: WAIT });
    await page.locator('#conn[data-state=resynced]').waitFor();

    // Answer the clarification in the page.
    const pending = page.locator('.clarification[data-status=pending]').first();
    await pending.waitFor({ timeout: WAIT });
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-session-clarification.png') });
    // An answer the server refuses is said in words, and the question stays open.
    await pending.locator('textarea[name=answer]').fill('x'.repeat(65));
    await pending.locator('button[type=submit]').click();
    await page.waitForFunction(() => /ANSWER_TOO_LARGE/.test(document.querySelector('.clarification[data-status=pending] .clar-error')?.textContent ?? ''), null, { timeout: WAIT });
    await pending.locator('textarea[name=answer]').fill('Focus on revenue');
    await pending.locator('button[type=submit]').click();
    await page.locator('.clarification[data-status=answered]').first().waitFor({ timeout: WAIT });
    // Every clarification (one per model on the clarified prompt) gets its answer.
    for (;;) {
      const more = page.locator('.clarification[data-status=pending]');
      if (await page.locator('#session-status[data-status=COMPLETED]').count()) break;
      if (await more.count()) {
        await more.first().locator('textarea[name=answer]').fill('Focus on revenue');
        await more.first().locator('button[type=submit]').click();
      }
      await page.waitForFunction(() => document.querySelector('.clarification[data-status=pending] button[type=submit]:not([disabled])')
        || document.querySelector('#session-status[data-status=COMPLETED]'), null, { timeout: WAIT });
    }
    await page.locator('#session-status[data-status=COMPLETED]').waitFor({ timeout: WAIT });
    await page.locator('#result').waitFor();
    // Answering again is refused, and the page says so.
    const answered = await page.locator('.clarification[data-status=answered]').count();
    assert.ok(answered >= 1);

    // Every event exactly once, in order, as the server logged them.
    const logged = await history(server.url, sessionId);
    const seqs = await pageSeqs(page, sessionId);
    assert.deepEqual(seqs, logged.map((e) => e.seq), 'the page kept each logged event once, in order');
    assert.equal(await page.locator('#log-count').textContent().then((t) => parseInt(t, 10)), logged.length);
    const cells = await page.locator('#grid td[data-status=completed]').count();
    assert.equal(cells, 4, 'two prompts × two models completed');
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-session.png'), fullPage: true });

    // Cancel another one.
    const other = await startFromForm(page, ['A long task to be cancelled']);
    await page.locator('#cancel:not([disabled])').click();
    await page.locator('#session-status[data-status=FAILED]').waitFor({ timeout: WAIT });
    await page.waitForFunction(() => /CANCELLED/.test(document.querySelector('#session-error')?.textContent ?? ''), null, { timeout: WAIT });
    assert.equal(await page.locator('#cancel').isDisabled(), true);

    // The sessions feed shows both, newest first, with their end states.
    await page.goto(`${server.url}/#/`);
    await page.locator(`.session-row[data-session-id="${other}"][data-status=FAILED]`).waitFor({ timeout: WAIT });
    await page.locator(`.session-row[data-session-id="${sessionId}"][data-status=COMPLETED]`).waitFor({ timeout: WAIT });
    const order = await page.locator('.session-row').evaluateAll((rows) => rows.map((r) => r.dataset.sessionId));
    assert.deepEqual(order.slice(0, 2), [other, sessionId]);
    await page.selectOption('#status-filter', 'FAILED');
    await page.waitForFunction(() => document.querySelector('#session-count')?.textContent.trim().startsWith('1'), null, { timeout: WAIT });
    await page.selectOption('#status-filter', '');
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-sessions.png') });
    assert.deepEqual(await accessibilityFailures(page), [], 'sessions view');
    // By keyboard: focus the first row, Enter opens that session.
    await page.locator('.session-row').first().focus();
    await page.keyboard.press('Enter');
    await page.locator(`#session-view[data-session-id="${other}"]`).waitFor({ timeout: WAIT });
    assert.deepEqual(await accessibilityFailures(page), [], 'session view');
    await page.goto(`${server.url}/#/new`);
    await page.locator('input[name=model]').first().waitFor();
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-new-session.png') });
    assert.deepEqual(await accessibilityFailures(page), [], 'new-session view');

    // A phone-width screen: nothing overflows the page sideways.
    await page.setViewportSize({ width: 360, height: 740 });
    for (const hash of ['#/', `#/session/${sessionId}`]) {
      await page.goto(`${server.url}/${hash}`);
      await page.locator(hash === '#/' ? '#sessions-view' : '#session-view').waitFor();
      const width = await page.evaluate(() => document.documentElement.scrollWidth);
      assert.ok(width <= 360, `${hash}: the page is ${width} px wide at 360`);
    }
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-phone.png') });
    assert.deepEqual(pageErrors, []);
  } finally {
    await context.close();
    await server.stop();
  }
});

test('1,000 sessions and a 10,000-event log stay virtualized', async () => {
  const server = await spawnHerald(['--max-events-per-session', '20000', '--max-session-bytes', '268435456']);
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await context.newPage();
  try {
    const post = (id, body) => fetch(`${server.url}/api/sessions/${id}/events`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body),
    }).then((r) => assert.equal(r.status, 202));
    const progress = (id, i) => ({
      event: 'progress',
      data: { status: 'PROCESSING', progress: Math.min(99, i % 100), prompts: { total: 1, completed: 0, processing: 1, pending: 0, failed: 0 }, hasClarifications: false, clarificationCount: 0 },
    });
    for (let i = 0; i < 1000; i += 50) {
      await Promise.all(Array.from({ length: 50 }, (_, j) => post(`bulk-${i + j}`, progress(`bulk-${i + j}`, i + j))));
    }
    for (let i = 0; i < 10000; i += 1000) {
      await post('long-log', Array.from({ length: 1000 }, (_, j) => progress('long-log', i + j)));
    }
    let began = Date.now();
    await page.goto(`${server.url}/#/`);
    await page.waitForFunction(() => parseInt(document.querySelector('#session-count')?.textContent ?? '0', 10) === 1001, null, { timeout: WAIT });
    console.log(`1,001 sessions listed in ${Date.now() - began} ms`);
    const rows = await page.locator('.session-row').count();
    assert.ok(rows > 0 && rows < 200, `${rows} session rows in the DOM for 1,001 sessions`);

    began = Date.now();
    await page.goto(`${server.url}/#/session/long-log`);
    await page.waitForFunction(() => parseInt(document.querySelector('#log-count')?.textContent ?? '0', 10) === 10000, null, { timeout: WAIT * 2 });
    console.log(`10,000-event log loaded in ${Date.now() - began} ms`);
    // Scrolling the log renders another window of rows, not all of them.
    await page.locator('#event-log').evaluate((log) => { log.scrollTop = log.scrollHeight / 2; });
    await page.waitForFunction(() => [...document.querySelectorAll('#event-log .log-row')]
      .some((r) => Math.abs(Number(r.dataset.seq) - 5000) < 300), null, { timeout: WAIT });
    const logRows = await page.locator('#event-log .log-row').count();
    assert.ok(logRows > 0 && logRows < 300, `${logRows} log rows in the DOM for 10,000 events`);
    const seqs = await pageSeqs(page, 'long-log');
    assert.deepEqual(seqs, Array.from({ length: 10000 }, (_, i) => i + 1));
    // A live event still arrives after the history.
    await post('long-log', progress('long-log', 5));
    await page.waitForFunction(() => parseInt(document.querySelector('#log-count')?.textContent ?? '0', 10) === 10001, null, { timeout: WAIT });
  } finally {
    await context.close();
    await server.stop();
  }
});

test('with auth on, the page asks for a token and says in words what is refused', async () => {
  const server = await spawnHerald(['--config', writeConfig(), '--jwt-secret', SECRET], { dev: false });
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await context.newPage();
  try {
    // A session the token below may not read.
    const admin = sign({ sub: 'someone-else', scope: 'read publish', sessions: ['*'] });
    const r = await fetch(`${server.url}/api/sessions/private-1/events`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${admin}` },
      body: JSON.stringify({ event: 'progress', data: { status: 'ACTIVE', progress: 0, prompts: { total: 0, completed: 0, processing: 0, pending: 0, failed: 0 }, hasClarifications: false, clarificationCount: 0 } }),
    });
    assert.equal(r.status, 202);

    await page.goto(`${server.url}/`);
    await page.locator('#token-form').waitFor({ timeout: WAIT });
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-token.png') });
    assert.deepEqual(await accessibilityFailures(page), [], 'token prompt');

    // An expired token is refused in words.
    await page.fill('#token', sign({ exp: Math.floor(Date.now() / 1000) - 60 }));
    await page.click('#token-form button[type=submit]');
    await page.waitForFunction(() => /TOKEN_EXPIRED/.test(document.querySelector('#token-error')?.textContent ?? ''), null, { timeout: WAIT });

    await page.fill('#token', sign({ scope: 'read answer cancel create', sessions: ['mine-*'] }));
    await page.click('#token-form button[type=submit]');
    await page.locator('#sessions-view').waitFor({ timeout: WAIT });
    await page.locator('#conn[data-state=connected]').waitFor({ timeout: WAIT });
    assert.equal(await page.evaluate(() => localStorage.length), 0, 'the token is not kept in localStorage');
    assert.ok(await page.evaluate(() => sessionStorage.getItem('herald.token')));
    // The feed lists only what the token may read.
    assert.equal(await page.locator('.session-row[data-session-id="private-1"]').count(), 0);

    await page.goto(`${server.url}/#/session/private-1`);
    await page.waitForFunction(() => /FORBIDDEN/.test(document.querySelector('#session-error')?.textContent ?? ''), null, { timeout: WAIT });
    const text = await page.locator('#session-error').textContent();
    assert.match(text, /may not/i);
  } finally {
    await context.close();
    await server.stop();
  }
});
