'use strict';
// Builds the markdown report of bench/run.sh from the JSON files in $OUT.
const fs = require('node:fs');
const path = require('node:path');

const env = process.env;
const OUT = env.OUT;
const servers = (env.SERVERS || 'herald floor node').split(/\s+/).filter(Boolean);
const scenarios = (env.SCENARIOS || 'idle fanout').split(/\s+/).filter(Boolean);
const has = (sc) => scenarios.includes(sc);

function readJson(file) {
  try {
    return JSON.parse(fs.readFileSync(path.join(OUT, file), 'utf8'));
  } catch {
    return null;
  }
}
function readJsonl(file) {
  try {
    return fs
      .readFileSync(path.join(OUT, file), 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l));
  } catch {
    return [];
  }
}
function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.floor((s.length - 1) / 2)] : undefined;
}

const data = {};

// The runs of one scenario that produced a result, the run with the median throughput (it
// represents the server: its latencies come with it), and what all runs lost.
function summarizeRuns(file) {
  const all = readJsonl(file);
  const runs = all.filter((r) => r.result);
  const sorted = [...runs].sort((a, b) => a.result.msgsPerSec - b.result.msgsPerSec);
  const med = sorted.length ? sorted[Math.floor((sorted.length - 1) / 2)] : null;
  const loss = runs.reduce(
    (acc, r) => {
      acc.missing += r.result.missing;
      acc.duplicates += r.result.duplicates;
      acc.outOfOrder += r.result.outOfOrder;
      acc.problems += r.result.problems.count + r.result.serverErrors;
      acc.failedRuns += r.exit === 0 ? 0 : 1;
      return acc;
    },
    { missing: 0, duplicates: 0, outOfOrder: 0, problems: 0, failedRuns: 0 },
  );
  loss.failedRuns += all.length - runs.length;
  return { runs, med, loss };
}

// cluster and paced: two nodes + redis-server
function clusterData(s, tag) {
  const { runs: cRuns, med: cMed, loss: cLoss } = summarizeRuns(`${s}-${tag}.jsonl`);
  let cWarnings;
  let cWarnSummary = '';
  try {
    cWarnings = Number(fs.readFileSync(path.join(OUT, `${s}-${tag}.warnings`), 'utf8').trim() || 0);
    cWarnSummary = fs.readFileSync(path.join(OUT, `${s}-${tag}.warnsummary`), 'utf8').trim();
  } catch {
    /* not run */
  }
  return {
    runs: cRuns,
    med: cMed,
    loss: cLoss,
    warnings: cWarnings,
    warnSummary: cWarnSummary,
    throughputs: cRuns.map((r) => r.result.msgsPerSec),
  };
}

for (const s of servers) {
  const idle = readJson(`${s}-idle.json`);
  const { runs, med, loss } = summarizeRuns(`${s}-fanout.jsonl`);
  let warnings;
  try {
    warnings = Number(fs.readFileSync(path.join(OUT, `${s}-fanout.warnings`), 'utf8').trim() || 0);
  } catch {
    warnings = undefined;
  }
  const perConn =
    idle && idle.ready > 0 ? (idle.rssAfterKiB - idle.rssBeforeKiB) / idle.ready : undefined;
  data[s] = {
    cluster: clusterData(s, 'cluster'),
    paced: clusterData(s, 'paced'),
    idle,
    perConn,
    warnings,
    runs,
    med,
    loss,
    throughputs: runs.map((r) => r.result.msgsPerSec),
  };
}

const fmt = (v, d = 0) =>
  v === undefined || v === null || Number.isNaN(v)
    ? 'n/a'
    : Number(v).toLocaleString('en-US', { minimumFractionDigits: d, maximumFractionDigits: d });
const ratio = (a, b, d = 2) =>
  a === undefined || b === undefined || a === null || b === null || !b ? 'n/a' : `${(a / b).toFixed(d)}x`;

const A = servers[0];
const B = servers[1];
// One column per server, then the ratio columns: with two servers A/B (as ever); with more,
// each other server (herald, floor, herald-before, ...) against node, herald/floor (what
// herald adds over the bare library) and herald/herald-before when both ran.
const ratioPairs = (() => {
  if (servers.length < 2) return [];
  if (servers.length === 2) return [[A, B]];
  const pairs = [];
  if (servers.includes('node')) for (const s of servers) if (s !== 'node') pairs.push([s, 'node']);
  if (servers.includes('herald') && servers.includes('floor')) pairs.push(['herald', 'floor']);
  if (servers.includes('herald') && servers.includes('herald-before')) pairs.push(['herald', 'herald-before']);
  if (servers.includes('herald') && servers.includes('herald-auth')) pairs.push(['herald-auth', 'herald']);
  for (const t of ['herald-sse', 'herald-ws']) if (servers.includes('herald') && servers.includes(t)) pairs.push([t, 'herald']);
  return pairs;
})();
// the servers the targets are judged on: A and B with two servers, else herald and node
const [TA, TB] = servers.length === 2 ? [A, B] : servers.length > 2 && servers.includes('herald') && servers.includes('node') ? ['herald', 'node'] : [A, undefined];
const rows = [];
function row(label, get, d = 0) {
  const v = {};
  for (const s of servers) v[s] = data[s] ? get(data[s]) : undefined;
  const cells = [label, ...servers.map((s) => fmt(v[s], d)), ...ratioPairs.map(([a, b]) => ratio(v[a], v[b]))];
  rows.push(`| ${cells.join(' | ')} |`);
}
// a row of text cells, one per server (f(s)), the ratio columns left empty
function textRow(label, f) {
  rows.push(`| ${[label, ...servers.map(f)].join(' | ')} |${' |'.repeat(ratioPairs.length)}`);
}
// a row of "all runs" lists, one per server (f(s)), the ratio columns empty
function listRow(label, f) {
  rows.push(`| ${[label, ...servers.map(f), ...ratioPairs.map(() => '')].join(' | ')} |`);
}

const lines = [];
lines.push(`# herald benchmark — ${env.STAMP}`);
lines.push('');
const nodeVersion = (pkg) => {
  try {
    return require(path.join(__dirname, 'node-reference/node_modules', pkg, 'package.json')).version;
  } catch {
    return 'n/a';
  }
};
// the socketioxide the floor server was built with (bench/floor/Cargo.lock)
const floorSocketioxide = () => {
  try {
    const lock = fs.readFileSync(path.join(__dirname, 'floor/Cargo.lock'), 'utf8');
    const m = /name = "socketioxide"\nversion = "([^"]+)"/.exec(lock);
    return m ? m[1] : 'n/a';
  } catch {
    return 'n/a';
  }
};
lines.push(
  `herald commit ${env.GIT_REV}; ` +
    (servers.includes('floor') ? `floor: socketioxide ${floorSocketioxide()} from crates.io, unpatched; ` : '') +
    (servers.includes('herald-before')
      ? `herald-before ${env.HERALD_BEFORE_REV ? `commit ${env.HERALD_BEFORE_REV}, ` : ''}binary \`${env.HERALD_BEFORE_BIN || 'n/a'}\`; `
      : '') +
    `Node ${process.version}, socket.io ${nodeVersion('socket.io')}` +
    (has('cluster')
      ? `, @socket.io/redis-adapter ${nodeVersion('@socket.io/redis-adapter')} (redis ${nodeVersion('redis')}); redis-server ${env.REDIS_VERSION || 'n/a'}.`
      : '.'),
);
lines.push(`Machine: ${env.MACHINE}. Server pinned to CPU ${env.SERVER_CPU}, load generator to CPU ${env.LOADGEN_CPU}.`);
lines.push(`Load average (1/5/15 min) before the build: ${env.LOADAVG_START}; at the end: ${env.LOADAVG_END} (the bench itself keeps ~2 busy).`);
if (env.HERALD_ARGS) lines.push(`herald extra flags: \`${env.HERALD_ARGS}\`.`);
const load =
  `${env.FANOUT_CLIENTS} clients / ${env.FANOUT_SESSIONS} sessions, ${env.FANOUT_EVENTS} progress events per session ` +
  `(batch ${env.FANOUT_BATCH}, ${env.FANOUT_PRODUCERS} producers, window ${env.FANOUT_WINDOW})`;
const desc = [];
if (has('fanout')) desc.push(`Fan-out: ${load}, median of ${env.FANOUT_RUNS} runs after a warm-up.`);
if (has('idle')) {
  desc.push(
    `Idle: ${env.IDLE_CLIENTS} subscribed websocket clients over ${env.IDLE_SESSIONS} sessions, ` +
      `RSS ${env.SETTLE_SECS} s after all are subscribed.`,
  );
}
if (has('cluster')) {
  const cload =
    `${env.FANOUT_CLIENTS} clients / ${env.FANOUT_SESSIONS} sessions, ${env.FANOUT_EVENTS} progress events per session ` +
    `(batch ${env.FANOUT_BATCH}, ${env.CLUSTER_PRODUCERS} producers, window ${env.CLUSTER_WINDOW})`;
  desc.push(
    `Cluster: two nodes of each server and one redis-server, all on CPU ${env.SERVER_CPU}` +
      `${env.REDIS_CPU === env.SERVER_CPU ? '' : ` (redis-server on ${env.REDIS_CPU === 'none' ? 'any CPU' : `CPU ${env.REDIS_CPU}`})`}; ` +
      `${cload}, clients on node A, events POSTed to node B; median of ${env.CLUSTER_RUNS} runs after a warm-up ` +
      `(${env.WARMUP_EVENTS} events/session).`,
  );
}
lines.push(desc.join(' '));
lines.push('');
const header = `| ${['metric', ...servers, ...ratioPairs.map(([a, b]) => `${a}/${b}`)].join(' | ')} |`;
const separator = `|---|${'---:|'.repeat(servers.length + ratioPairs.length)}`;
const single = has('fanout') || has('idle');
if (single) {
  rows.push(header, separator);
  row('fan-out throughput, msgs/s (median run)', (x) => x.med && x.med.result.msgsPerSec);
  listRow('fan-out throughput, msgs/s (all runs)', (s) => (data[s] ? data[s].throughputs.map((v) => fmt(v)).join(' / ') : 'n/a'));
  row('latency POST→receipt p50, ms', (x) => x.med && x.med.result.latencyMs.p50, 2);
  row('latency POST→receipt p99, ms', (x) => x.med && x.med.result.latencyMs.p99, 2);
  row('latency POST→receipt max, ms', (x) => x.med && x.med.result.latencyMs.max, 2);
  row('POST round trip p50, ms', (x) => x.med && x.med.result.postMs.p50, 2);
  row('server CPU during the median run (incl. connecting), s', (x) => x.med && x.med.serverCpuSecs, 2);
  row('server CPU per 1,000 delivered msgs, ms', (x) => x.med && (1e6 * x.med.serverCpuSecs) / x.med.result.delivered, 2);
  row('load generator CPU, % of its core', (x) => x.med && x.med.result.loadgenCpuPct, 0);
  {
    const l = (s) => (data[s] ? `${data[s].loss.missing} / ${data[s].loss.duplicates} / ${data[s].loss.outOfOrder}` : 'n/a');
    textRow('missing / duplicate / out-of-order (all runs)', l);
    const p = (s) => (data[s] ? `${data[s].loss.problems} / ${data[s].loss.failedRuns}` : 'n/a');
    textRow('protocol problems / failed runs', p);
    const w = (s) => (data[s] && data[s].warnings !== undefined ? String(data[s].warnings) : 'n/a');
    textRow('server log warnings/errors during fan-out', w);
  }
  row('idle: RSS before connecting, KiB', (x) => x.idle && x.idle.rssBeforeKiB);
  row('idle: RSS with all clients subscribed, KiB', (x) => x.idle && x.idle.rssAfterKiB);
  row('idle: memory per subscribed connection, KiB', (x) => x.perConn, 1);
  row('idle: connect+subscribe rate, /s', (x) => x.idle && x.idle.result && x.idle.result.connectsPerSec);
  lines.push(...rows);
  lines.push('');
}

// (herald's targets: not judged for the floor server, which is not herald)
if (single && TB && TA !== 'floor' && data[TA] && data[TB]) {
  const [A, B] = [TA, TB];
  const tA = data[A].med && data[A].med.result.msgsPerSec;
  const tB = data[B].med && data[B].med.result.msgsPerSec;
  const mA = data[A].perConn;
  const mB = data[B].perConn;
  const ok = (c) => (c ? 'met' : 'NOT met');
  lines.push('Targets:');
  lines.push(
    `- fan-out throughput ≥ 3x ${B}: ${ratio(tA, tB)} — ${tA && tB ? ok(tA >= 3 * tB && data[A].loss.missing === 0) : 'n/a'}`,
  );
  for (const s of servers) {
    const cpu = data[s].med && data[s].med.result.loadgenCpuPct;
    if (cpu > 80) {
      lines.push(
        `- note: the load generator used ${cpu.toFixed(0)}% of its core during ${s}'s median run, so ${s}'s throughput ` +
          'is close to what one load-generator core can receive: read it as a lower bound (the CPU-per-message row does not depend on it).',
      );
    }
  }
  lines.push(`- memory per idle subscribed connection ≤ ${B}'s: ${fmt(mA, 1)} vs ${fmt(mB, 1)} KiB — ${mA !== undefined && mB !== undefined ? ok(mA <= mB) : 'n/a'}`);
  lines.push('');
}
if (has('cluster')) {
  rows.length = 0;
  const crow = (label, get, d = 0) => row(label, (x) => (x.cluster.med ? get(x.cluster.med, x.cluster) : undefined), d);
  lines.push('## Cluster (two nodes through Redis)');
  lines.push('');
  if (servers.includes('floor')) {
    lines.push('floor: not run (the floor server has no cluster mode).');
    lines.push('');
  }
  rows.push(header, separator);
  crow('throughput, msgs/s (median run)', (m) => m.result.msgsPerSec);
  {
    const t = (s) => (data[s] ? data[s].cluster.throughputs.map((v) => fmt(v)).join(' / ') || 'n/a' : 'n/a');
    textRow('throughput, msgs/s (all runs)', t);
  }
  crow('latency POST (node B)→receipt (node A) p50, ms', (m) => m.result.latencyMs.p50, 2);
  crow('latency p99, ms', (m) => m.result.latencyMs.p99, 2);
  crow('latency max, ms', (m) => m.result.latencyMs.max, 2);
  crow('POST round trip p50, ms', (m) => m.result.postMs.p50, 2);
  crow('POST round trip p99, ms', (m) => m.result.postMs.p99, 2);
  crow('CPU node A (the clients) during the median run, s', (m) => m.nodeACpuSecs, 2);
  crow('CPU node B (the POSTs) during the median run, s', (m) => m.nodeBCpuSecs, 2);
  crow('CPU redis-server during the median run, s', (m) => m.redisCpuSecs, 2);
  crow('CPU of the cluster (A+B+redis) per 1,000 delivered msgs, ms', (m) =>
    m.result.delivered ? (1e6 * (m.nodeACpuSecs + m.nodeBCpuSecs + m.redisCpuSecs)) / m.result.delivered : undefined, 2);
  crow('median run wall time (first POST → last receipt), s', (m) => m.result.durationSecs, 2);
  crow('load generator CPU, % of its core', (m) => m.result.loadgenCpuPct, 0);
  {
    const l = (s) => {
      const c = data[s] && data[s].cluster;
      return c && c.runs.length ? `${c.loss.missing} / ${c.loss.duplicates} / ${c.loss.outOfOrder}` : 'n/a';
    };
    textRow('missing / duplicate / out-of-order (all runs)', l);
    const p = (s) => {
      const c = data[s] && data[s].cluster;
      return c && (c.runs.length || c.loss.failedRuns) ? `${c.loss.problems} / ${c.loss.failedRuns}` : 'n/a';
    };
    textRow('protocol problems / failed runs', p);
    const w = (s) => (data[s] && data[s].cluster.warnings !== undefined ? String(data[s].cluster.warnings) : 'n/a');
    textRow('node log warnings/errors (warm-up + runs, both nodes)', w);
  }
  lines.push(...rows);
  lines.push('');
  for (const s of servers) {
    const c = data[s] && data[s].cluster;
    if (c && c.warnSummary) {
      lines.push(`${s} node log, most frequent warnings (count, node, message):`);
      lines.push('');
      lines.push('```');
      lines.push(c.warnSummary);
      lines.push('```');
      lines.push('');
    }
  }
  const target = env.CLUSTER_TARGET_SERVER || 'herald';
  // the pair it is judged against: node's when more than two servers ran
  const other =
    servers.length > 2 && servers.includes('node') && target !== 'node' ? 'node' : [A, B].find((s) => s && s !== target);
  const t = data[target] && data[target].cluster;
  if (t && t.runs.length) {
    const ok = (c) => (c ? 'met' : 'NOT met');
    const lost = t.loss.missing + t.loss.duplicates + t.loss.outOfOrder;
    const all = t.runs.length + (t.loss.failedRuns || 0);
    lines.push(`Cluster targets (${target}):`);
    lines.push(
      `- no loss: ${t.loss.missing} missing / ${t.loss.duplicates} duplicate / ${t.loss.outOfOrder} out-of-order over ${all} runs ` +
        `(${t.loss.failedRuns} failed) — ${ok(lost === 0 && t.loss.failedRuns === 0)}`,
    );
    const o = other && data[other] && data[other].cluster;
    const tT = t.med && t.med.result.msgsPerSec;
    const tO = o && o.med && o.med.result.msgsPerSec;
    lines.push(`- throughput ≥ 2x ${other || 'node'} pair: ${tT && tO ? `${ratio(tT, tO)} — ${ok(tT >= 2 * tO)}` : 'n/a'}`);
    const p99s = t.runs.map((r) => r.result.latencyMs.p99);
    const worst = Math.max(...p99s);
    lines.push(
      `- p99 latency < 100 ms: ${fmt(t.med && t.med.result.latencyMs.p99, 2)} ms in the median run, worst run ${fmt(worst, 2)} ms — ` +
        ok(worst < 100),
    );
    const win = Number(env.CLUSTER_WINDOW);
    if (win > 0) {
      // Little's law: a saturated server fills the window, and the window drains at its rate
      const inFlight = win * Number(env.FANOUT_CLIENTS);
      const drain = [target, other]
        .filter((s) => s && data[s] && data[s].cluster.med)
        .map((s) => `${s} ${fmt((1000 * inFlight) / data[s].cluster.med.result.msgsPerSec)} ms`)
        .join(', ');
      lines.push(
        `- note: the window lets ${fmt(inFlight)} messages (window × clients) be posted but not yet received; ` +
          `a server that accepts POSTs faster than it delivers fills it, and a full window takes ${drain} ` +
          'to drain at the median rates: a saturated run\'s mean queueing delay approaches that (Little\'s law); ' +
          'a p99 well above it means some sessions wait longer than others.',
      );
    }
    const cpu = t.med && t.med.result.loadgenCpuPct;
    if (cpu > 80) {
      lines.push(
        `- note: the load generator used ${cpu.toFixed(0)}% of its core during ${target}'s median run: read the throughput as a lower bound.`,
      );
    }
    lines.push('');
  }
}
if (has('paced')) {
  const target = env.CLUSTER_TARGET_SERVER || 'herald';
  const t = data[target] && data[target].paced;
  const rate = Number(env.PACED_RATE);
  lines.push('## Cluster at a fixed offered load');
  lines.push('');
  lines.push(
    `${target}'s cluster (same layout and load as above) with the POSTs paced so that subscribers should receive ` +
      `${fmt(rate)} msgs/s${env.PACED_RATE_FROM ? ` (${env.PACED_RATE_FROM})` : ''}; window ${env.CLUSTER_WINDOW} as a safety net. ` +
      `Median of ${t ? t.runs.length : 0} runs.`,
  );
  lines.push('');
  if (t && t.runs.length) {
    rows.length = 0;
    rows.push(`| metric | ${target} |`, '|---|---:|');
    const m = t.med;
    const r1 = (label, v, d = 0) => rows.push(`| ${label} | ${fmt(v, d)} |`);
    r1('offered load, msgs/s', rate);
    r1('delivered, msgs/s (median run)', m.result.msgsPerSec);
    rows.push(`| delivered, msgs/s (all runs) | ${t.throughputs.map((v) => fmt(v)).join(' / ')} |`);
    r1('latency p50, ms', m.result.latencyMs.p50, 2);
    r1('latency p99, ms', m.result.latencyMs.p99, 2);
    rows.push(`| latency p99, ms (all runs) | ${t.runs.map((r) => fmt(r.result.latencyMs.p99, 2)).join(' / ')} |`);
    r1('latency max, ms', m.result.latencyMs.max, 2);
    r1('CPU of the cluster (A+B+redis) per 1,000 delivered msgs, ms',
      m.result.delivered ? (1e6 * (m.nodeACpuSecs + m.nodeBCpuSecs + m.redisCpuSecs)) / m.result.delivered : undefined, 2);
    rows.push(`| missing / duplicate / out-of-order (all runs) | ${t.loss.missing} / ${t.loss.duplicates} / ${t.loss.outOfOrder} |`);
    rows.push(`| protocol problems / failed runs | ${t.loss.problems} / ${t.loss.failedRuns} |`);
    rows.push(`| node log warnings/errors | ${t.warnings === undefined ? 'n/a' : t.warnings} |`);
    lines.push(...rows);
    lines.push('');
    const worst = Math.max(...t.runs.map((r) => r.result.latencyMs.p99));
    const sustained = m.result.msgsPerSec >= 0.95 * rate;
    const lost = t.loss.missing + t.loss.duplicates + t.loss.outOfOrder + t.loss.failedRuns;
    lines.push(
      `Target (${target}): at ${fmt(rate)} msgs/s, no loss and p99 < 100 ms in every run: ` +
        `delivered ${fmt(m.result.msgsPerSec)} msgs/s (${sustained ? 'sustained' : 'NOT sustained'}), ` +
        `worst p99 ${fmt(worst, 2)} ms, ${lost} lost/failed — ${sustained && worst < 100 && lost === 0 ? 'met' : 'NOT met'}`,
    );
    lines.push('');
  }
}
lines.push(`Raw results: bench/results/${env.STAMP}/`);
console.log(lines.join('\n'));
