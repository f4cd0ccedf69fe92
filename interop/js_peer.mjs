// A js-libp2p peer that tests/test_interop_js.py runs against a real Ostrom daemon.
//
// Usage: node interop/js_peer.mjs <multiaddr ending in /p2p/<peer id>> <topic>
//          [--until-type TYPE] [--timeout SECONDS]
//
// It dials the Ostrom node (TCP + Noise + Yamux), reports what identify learned, joins the
// gossipsub topic and decodes every message on it as an Ostrom record (DAG-CBOR,
// docs/PROTOCOL.md sections 4 and 11.2). It exits after the first record, or with
// --until-type after the first record of that type: a peer that joins a topic soon after a
// record was published also receives that record, through IHAVE/IWANT gossip from the
// Ostrom node's message cache. Every line on stdout is one JSON object with an `event` key:
//   {"event":"identify","peer":...,"protocols":[...],"agent":...}
//   {"event":"subscribed","topic":...}
//   {"event":"subscriber","peer":...}  the Ostrom node told us it is on the topic
//   {"event":"mesh","peer":...}        the Ostrom node is in our mesh for the topic
//   {"event":"record","cid":...,"type":...,"message":...,"canonical":...,"from":...}
// and "disconnected", "timeout" or "error" when things go wrong. Diagnostics go to stderr.
// Exit status: 0 after the awaited record, 2 on timeout, 1 on any error, 3 on SIGTERM/SIGINT.

// libp2p 3.x calls Promise.withResolvers, which Node 20 lacks. Static imports would run before
// this line, so everything libp2p is imported dynamically below.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve
    let reject
    const promise = new this((res, rej) => {
      resolve = res
      reject = rej
    })
    return { promise, resolve, reject }
  }
}

const { createHash } = await import('node:crypto')
const { parseArgs } = await import('node:util')
const { createLibp2p } = await import('libp2p')
const { tcp } = await import('@libp2p/tcp')
const { noise } = await import('@chainsafe/libp2p-noise')
const { yamux } = await import('@chainsafe/libp2p-yamux')
const { identify } = await import('@libp2p/identify')
const { gossipsub, StrictSign } = await import('@libp2p/gossipsub')
const { multiaddr } = await import('@multiformats/multiaddr')
const dagCbor = await import('@ipld/dag-cbor')
const { CID } = await import('multiformats/cid')
const { sha256 } = await import('multiformats/hashes/sha2')

// Without a bound a lost message would hang the test; one minute is many heartbeats (1 s).
const DEFAULT_TIMEOUT_S = 60
// node.stop() closes connections politely; if that ever hangs we exit anyway.
const STOP_TIMEOUT_MS = 5000
// The gossipsub default, and the heartbeat Ostrom runs (ostrom/node/mesh.py): the two sides
// graft each other within about a second of meeting.
const HEARTBEAT_MS = 1000

const EXIT_RECORD = 0
const EXIT_ERROR = 1
const EXIT_TIMEOUT = 2
const EXIT_SIGNAL = 3

function emit (event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + '\n')
}

// Ostrom's message id (PROTOCOL.md 11.2): sha256(topic UTF-8 || 0x00 || data). With the same
// id on both sides, IHAVE/IWANT gossip refers to the same messages.
function ostromMessageId (msg) {
  return new Uint8Array(
    createHash('sha256').update(msg.topic, 'utf8').update(Uint8Array.of(0)).update(msg.data).digest()
  )
}

function sameBytes (a, b) {
  return a.length === b.length && a.every((byte, i) => byte === b[i])
}

async function decodeRecord (data) {
  const value = dagCbor.decode(data)
  const cid = CID.create(1, dagCbor.code, await sha256.digest(data))
  return {
    cid: cid.toString(), // CIDv1 text defaults to base32, Ostrom's text form (PROTOCOL.md 3.1)
    type: typeof value?.type === 'string' ? value.type : null,
    message: typeof value?.message === 'string' ? value.message : null,
    // Re-encoding must give the same bytes: Ostrom writes canonical DAG-CBOR only.
    canonical: sameBytes(dagCbor.encode(value), data)
  }
}

const USAGE = 'usage: node js_peer.mjs <multiaddr> <topic> [--until-type TYPE] [--timeout SECONDS]\n'
let args
try {
  args = parseArgs({
    allowPositionals: true,
    options: { 'until-type': { type: 'string' }, timeout: { type: 'string' } }
  })
} catch (err) {
  process.stderr.write(`${err.message}\n${USAGE}`)
  process.exit(EXIT_ERROR)
}
const [target, topic] = args.positionals
if (args.positionals.length !== 2) {
  process.stderr.write(USAGE)
  process.exit(EXIT_ERROR)
}
const untilType = args.values['until-type'] ?? null
const timeoutS = args.values.timeout === undefined ? DEFAULT_TIMEOUT_S : Number(args.values.timeout)
if (!(timeoutS > 0)) {
  process.stderr.write(`--timeout must be a positive number of seconds, not ${args.values.timeout}\n`)
  process.exit(EXIT_ERROR)
}

const remote = multiaddr(target)
const remotePeer = remote.getComponents().find((c) => c.name === 'p2p')?.value
if (remotePeer === undefined) {
  process.stderr.write(`the multiaddr must end in /p2p/<peer id>: ${target}\n`)
  process.exit(EXIT_ERROR)
}

const node = await createLibp2p({
  addresses: { listen: [] }, // we only dial
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: {
    identify: identify(),
    pubsub: gossipsub({
      globalSignaturePolicy: StrictSign,
      fallbackToFloodsub: false,
      msgIdFn: ostromMessageId,
      heartbeatInterval: HEARTBEAT_MS,
      emitSelf: false
    })
  }
})

let stopping = false
async function finish (code) {
  if (stopping) return
  stopping = true
  const timer = setTimeout(() => process.exit(code), STOP_TIMEOUT_MS)
  try {
    await node.stop()
  } catch (err) {
    process.stderr.write(`stopping libp2p failed: ${err?.stack ?? err}\n`)
  }
  clearTimeout(timer)
  process.exit(code)
}

function fail (err) {
  emit('error', { message: String(err?.message ?? err) })
  process.stderr.write(`${err?.stack ?? err}\n`)
  void finish(EXIT_ERROR)
}

process.on('SIGTERM', () => void finish(EXIT_SIGNAL))
process.on('SIGINT', () => void finish(EXIT_SIGNAL))
process.on('unhandledRejection', fail)

const deadline = setTimeout(() => {
  emit('timeout', { seconds: timeoutS })
  void finish(EXIT_TIMEOUT)
}, timeoutS * 1000)

node.addEventListener('peer:identify', (evt) => {
  const { peerId, protocols, agentVersion } = evt.detail
  if (peerId.toString() !== remotePeer) return
  emit('identify', { peer: peerId.toString(), protocols: [...protocols].sort(), agent: agentVersion ?? null })
})
node.addEventListener('peer:disconnect', (evt) => {
  if (evt.detail.toString() === remotePeer) emit('disconnected', { peer: remotePeer })
})

const pubsub = node.services.pubsub
let seenSubscriber = false
let seenMesh = false
function checkTopicPeers () {
  if (!seenSubscriber && pubsub.getSubscribers(topic).some((p) => p.toString() === remotePeer)) {
    seenSubscriber = true
    emit('subscriber', { peer: remotePeer })
  }
  if (!seenMesh && pubsub.getMeshPeers(topic).includes(remotePeer)) {
    seenMesh = true
    emit('mesh', { peer: remotePeer })
  }
}
pubsub.addEventListener('subscription-change', checkTopicPeers)
pubsub.addEventListener('gossipsub:heartbeat', checkTopicPeers)

pubsub.addEventListener('message', (evt) => {
  const msg = evt.detail
  if (msg.topic !== topic || stopping) return
  decodeRecord(msg.data).then((record) => {
    emit('record', { ...record, from: msg.type === 'signed' ? msg.from.toString() : null })
    if (untilType === null || record.type === untilType) {
      clearTimeout(deadline)
      void finish(EXIT_RECORD)
    }
  }, fail)
})

try {
  pubsub.subscribe(topic)
  emit('subscribed', { topic })
  await node.dial(remote)
} catch (err) {
  fail(err)
}
