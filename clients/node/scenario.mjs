#!/usr/bin/env node
// A short VMM scenario against an mtrremu.v1 server, from Node.js (@grpc/grpc-js + proto-loader).
//
//   node clients/node/scenario.mjs <target>        # target: 127.0.0.1:PORT or unix:/path
//
// Every address is a byte address (a gpa), as everywhere in the API; memory types arrive as enum
// names. Prints ONE JSON document to stdout:
//   {"steps": [{"name": ..., "outcome": <EventOutcome as received>}
//              | {"name": ..., "results": [<OperationResult as received>, ...]}   (Execute)
//              | {"name": ..., "error": {"code": <status name>, "reason": <ErrorInfo reason>}}, ...],
//    "counters": <ReadCountersResponse.outcome.vm_counters as received>}
// Exits non-zero if the server does not answer as a KVM-like emulator must (a bad guest write
// that is not a #GP, a bad host write that is not INVALID_ARGUMENT, an ErrorInfo reason that the
// plain "mtrremu-reason" trailer does not repeat) or on any other RPC failure.
//
// tests/test_node_interop.py replays the same step list through the Python client and compares
// the two documents: keep SCENARIO below and `scenario()` in that test in step.

import path from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PROTOS = path.resolve(HERE, "../../protos");
const PROTO = path.join(PROTOS, "mtrremu/v1/emulator.proto");
const DEADLINE_MS = 30_000;

const KIB = 1024n;
const MIB = 1024n * KIB;
const GIB = 1024n * MIB;

// -- MSRs ---------------------------------------------------------------------------------------

const DEFTYPE = 0x2ff;
const FIXED_MSRS = [0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f];
const VARIABLE_MSRS = Array.from({ length: 16 }, (_, i) => 0x200 + i);
const CR0_RESET_CD_CLEARED = 0x11n; // 0x60000010 with CD (bit 30) and NW (bit 29) cleared, plus PE
const CR0_CD = 1n << 30n;

// -- the VM and the scenario --------------------------------------------------------------------

/** q35-like: RAM [0, 640 KiB), [1 MiB, 2 GiB), [4 GiB, 6 GiB); one non-coherent DMA device. */
const VM_CONFIG = {
  vcpus: 2,
  noncoherent_dma: 1,
  memslots: [
    { base_gpa: 0n, size_bytes: 640n * KIB, kind: "MEMSLOT_KIND_RAM", name: "low" },
    { base_gpa: MIB, size_bytes: 2n * GIB - MIB, kind: "MEMSLOT_KIND_RAM", name: "below-4g" },
    { base_gpa: 4n * GIB, size_bytes: 2n * GIB, kind: "MEMSLOT_KIND_RAM", name: "above-4g" },
  ],
};
const STRATEGY = "fine-grained";

const hex = (n) => `0x${BigInt(n).toString(16)}`;

/** Step constructors: each step is one RPC on the VM. Names are the comparison key with Python. */
const wrmsr = (phase, vcpu, msr, value, initiator) => ({
  name: `${phase}: vcpu${vcpu} ${initiator === "host" ? "host" : "guest"} wrmsr ${hex(msr)}=${hex(value)}`,
  rpc: "WriteMsr",
  operation: {
    vcpu,
    msr,
    value: BigInt(value),
    initiator: initiator === "host" ? "INITIATOR_HOST" : "INITIATOR_GUEST",
  },
});
const cr0 = (phase, vcpu, value) => ({
  name: `${phase}: vcpu${vcpu} guest cr0=${hex(value)}`,
  rpc: "WriteCr0",
  operation: { vcpu, value: BigInt(value), initiator: "INITIATOR_GUEST" },
});
const access = (phase, vcpu, gpa) => ({
  name: `${phase}: vcpu${vcpu} access ${hex(gpa)}`,
  rpc: "AccessGpa",
  operation: { vcpu, gpa: BigInt(gpa) },
});
/** KVM_SET_MSRS: host writes in order; outcome.value says how many were written. */
const wrmsrs = (phase, vcpu, pairs) => ({
  name: `${phase}: vcpu${vcpu} host wrmsrs ${pairs.length} msrs`,
  rpc: "WriteMsrs",
  operation: { vcpu, msrs: pairs.map(([msr, value]) => ({ msr, value: BigInt(value) })) },
});
const readState = (phase, vcpu) => ({
  name: `${phase}: vcpu${vcpu} state`,
  rpc: "ReadVcpuState",
  operation: { vcpu },
});
const lookup = (phase, gpa) => ({
  name: `${phase}: lookup ${hex(gpa)}`,
  rpc: "LookupGpa",
  operation: { gpa: BigInt(gpa) },
});
const staleness = (phase, vcpu) => ({
  name: `${phase}: vcpu${vcpu} staleness`,
  rpc: "CheckStaleness",
  operation: { vcpu },
});
/** An Execute batch: operations (each `{<oneof member>: {...}}`) whose results come back in order. */
const batch = (phase, operations) => ({
  name: `${phase}: batch of ${operations.length}`,
  rpc: "Execute",
  operations,
});
const faultRange = (phase, vcpu, start, end) => ({
  name: `${phase}: vcpu${vcpu} fault-range [${hex(start)}, ${hex(end)})`,
  rpc: "FaultRange",
  operation: { vcpu, start_gpa: BigInt(start), end_gpa: BigInt(end) },
});

/** QEMU's reset push on one vCPU: one KVM_SET_MSRS of zeros, defType first, then fixed, then
 * variable. */
const resetPush = (vcpu) =>
  wrmsrs(
    "qemu-reset-push",
    vcpu,
    [DEFTYPE, ...FIXED_MSRS, ...VARIABLE_MSRS].map((msr) => [msr, 0n]),
  );

/** SeaBIOS mtrr_setup on the BSP (after transition32 cleared CD/NW), no CD toggle around it. */
const seabiosMtrrSetup = (vcpu) => {
  const p = "seabios-mtrr-setup";
  return [
    wrmsr(p, vcpu, DEFTYPE, 0n),
    wrmsr(p, vcpu, 0x250, 0x0606060606060606n),
    wrmsr(p, vcpu, 0x258, 0x0606060606060606n),
    wrmsr(p, vcpu, 0x259, 0n),
    ...FIXED_MSRS.filter((msr) => msr >= 0x268).map((msr) =>
      wrmsr(p, vcpu, msr, 0x0505050505050505n),
    ),
    ...VARIABLE_MSRS.map((msr) => wrmsr(p, vcpu, msr, 0n)),
    wrmsr(p, vcpu, 0x200, 0xc0000000n), // PhysBase0: 3 GiB, type 0 (UC)
    wrmsr(p, vcpu, 0x201, 0xffc0000800n), // PhysMask0: 1 GiB at MAXPHYADDR 40, V set
    wrmsr(p, vcpu, DEFTYPE, 0xc06n), // E + FE, default WB
  ];
};

/** The scenario, in order. Marked steps are checked: `expect: "gp"` / `expect: "INVALID_ARGUMENT"`. */
const SCENARIO = [
  resetPush(0),
  resetPush(1),
  cr0("seabios-transition32", 0, CR0_RESET_CD_CLEARED),
  ...seabiosMtrrSetup(0),
  cr0("seabios-entry-smp", 1, CR0_RESET_CD_CLEARED),
  access("accesses", 0, 0x0n),
  access("accesses", 0, 0x9f000n),
  access("accesses", 0, 0x100000n),
  access("accesses", 0, 0xc0000000n), // in the PCI hole, outside every memslot: MMIO exit
  access("accesses", 0, 0x100000000n),
  faultRange("fault-range", 1, 0x100000n, 0x40000000n),
  cr0("cd-toggle", 0, CR0_RESET_CD_CLEARED | CR0_CD),
  cr0("cd-toggle", 0, CR0_RESET_CD_CLEARED),
  { ...wrmsr("bad-guest-write", 0, 0x202, 0x80000002n), expect: "gp" }, // type 2 is reserved
  { ...wrmsr("bad-host-write", 0, DEFTYPE, 0x300n, "host"), expect: "INVALID_ARGUMENT" }, // bits 8-9
  // A host write stopping at its second MSR: value 1, rejected says why.
  wrmsrs("partial-set-msrs", 1, [
    [0x277, 0x0007040600070406n], // PAT: its reset value
    [DEFTYPE, 0x300n], // reserved bits 8-9: refused, nothing after it runs
    [0x200, 0n],
  ]),
  readState("snapshot", 0),
  lookup("snapshot", 0x100000000n),
  staleness("snapshot", 0),
  batch("batch", [
    { access_gpa: { vcpu: 1, gpa: 0x40000000n } },
    { read_vcpu_state: { vcpu: 1 } },
    { write_cr0: { vcpu: 7, value: 0n, initiator: "INITIATOR_GUEST" } }, // no vCPU 7: an error result
    { lookup_gpa: { gpa: 0x40000000n } },
    { read_counters: {} },
  ]),
];

// -- google.rpc.Status from the grpc-status-details-bin trailer ---------------------------------
// A minimal protobuf wire reader: Status {1 code, 2 message, 3 repeated Any details},
// Any {1 type_url, 2 value}, ErrorInfo {1 reason, 2 domain, 3 map metadata}.

function* wireFields(buf) {
  let pos = 0;
  const varint = () => {
    let result = 0n;
    let shift = 0n;
    for (;;) {
      if (pos >= buf.length) throw new Error("truncated varint");
      const byte = buf[pos++];
      result |= BigInt(byte & 0x7f) << shift;
      if (!(byte & 0x80)) return result;
      shift += 7n;
    }
  };
  while (pos < buf.length) {
    const key = Number(varint());
    const field = key >>> 3;
    const wire = key & 7;
    if (wire === 0) yield { field, value: varint() };
    else if (wire === 2) {
      const len = Number(varint());
      if (pos + len > buf.length) throw new Error("truncated field");
      yield { field, value: buf.subarray(pos, pos + len) };
      pos += len;
    } else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else throw new Error(`unsupported wire type ${wire}`);
  }
}

const ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo";

/** The reason of the first google.rpc.ErrorInfo in a failed call's status details, if any.
 * (Without a protobuf runtime for google/rpc/status.proto, the "mtrremu-reason" trailer has it.) */
function errorInfoReason(error) {
  const blobs = error.metadata?.get("grpc-status-details-bin") ?? [];
  for (const blob of blobs) {
    const status = Buffer.isBuffer(blob) ? blob : Buffer.from(String(blob), "base64");
    for (const { field, value } of wireFields(status)) {
      if (field !== 3 || typeof value === "bigint") continue;
      let typeUrl = "";
      let payload = null;
      for (const any of wireFields(value)) {
        if (any.field === 1) typeUrl = any.value.toString("utf8");
        if (any.field === 2) payload = any.value;
      }
      if (typeUrl !== ERROR_INFO_TYPE || payload === null) continue;
      for (const info of wireFields(payload)) {
        if (info.field === 1) return info.value.toString("utf8");
      }
    }
  }
  return undefined;
}

const statusName = (code) => grpc.status[code] ?? String(code);

// -- running it ---------------------------------------------------------------------------------

/** BigInt → decimal string for proto-loader's uint64 fields (longs: String round-trips). */
const wire = (value) =>
  typeof value === "bigint"
    ? value.toString()
    : Array.isArray(value)
      ? value.map(wire)
      : value !== null && typeof value === "object"
        ? Object.fromEntries(Object.entries(value).map(([k, v]) => [k, wire(v)]))
        : value;

function loadService() {
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: false,
    oneofs: true,
    includeDirs: [PROTOS],
  });
  return grpc.loadPackageDefinition(definition).mtrremu.v1.EmulatorService;
}

function unary(client, rpc, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + DEADLINE_MS);
    client[rpc](wire(request), { deadline }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

/** One Execute stream with one batch: every result, across the responses answering it (a
 * batch may take several, each under 1 MiB; the last has last = true). */
function execute(client, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + DEADLINE_MS);
    const call = client.Execute({ deadline });
    const results = [];
    let last = false;
    call.on("data", (response) => {
      results.push(...response.results);
      last = response.last === true;
    });
    call.on("error", reject);
    call.on("end", () =>
      last ? resolve(results) : reject(new ScenarioError("Execute ended before its last response")),
    );
    call.write(wire(request));
    call.end();
  });
}

class ScenarioError extends Error {}

async function run(target) {
  const EmulatorService = loadService();
  const client = new EmulatorService(target, grpc.credentials.createInsecure());
  try {
    const { vm } = await unary(client, "CreateVm", { config: VM_CONFIG, strategy: STRATEGY });
    const vmId = vm.vm_id;
    const steps = [];
    try {
      for (const step of SCENARIO) {
        if (step.rpc === "Execute") {
          const request = { vm_id: vmId, operations: step.operations, batch_id: 1n };
          steps.push({ name: step.name, results: await execute(client, request) });
          continue;
        }
        const request = { vm_id: vmId, operation: step.operation };
        let response;
        try {
          response = await unary(client, step.rpc, request);
        } catch (error) {
          if (step.expect === undefined || typeof error.code !== "number") throw error;
          const code = statusName(error.code);
          if (code !== step.expect) {
            throw new ScenarioError(`${step.name}: expected ${step.expect}, got ${code}`);
          }
          const reason = errorInfoReason(error);
          const trailer = error.metadata?.get("mtrremu-reason")?.[0];
          if (trailer !== reason) {
            throw new ScenarioError(`${step.name}: ErrorInfo says ${reason}, trailer ${trailer}`);
          }
          steps.push({ name: step.name, error: reason === undefined ? { code } : { code, reason } });
          continue;
        }
        const { outcome } = response;
        if (step.expect === "gp" && !outcome?.guest_fault?.reason) {
          throw new ScenarioError(`${step.name}: expected a guest #GP, got ${JSON.stringify(outcome)}`);
        }
        if (step.expect !== undefined && step.expect !== "gp") {
          throw new ScenarioError(`${step.name}: expected ${step.expect}, the call succeeded`);
        }
        steps.push({ name: step.name, outcome });
      }
      const { outcome } = await unary(client, "ReadCounters", { vm_id: vmId });
      return { steps, counters: outcome.vm_counters };
    } finally {
      await unary(client, "DeleteVm", { vm_id: vmId });
    }
  } finally {
    client.close();
  }
}

async function main(argv) {
  if (argv.length !== 1) {
    process.stderr.write("usage: node scenario.mjs <target>   (127.0.0.1:PORT or unix:/path)\n");
    return 2;
  }
  try {
    const result = await run(argv[0]);
    process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
    return 0;
  } catch (error) {
    const detail =
      typeof error.code === "number"
        ? `RPC failed: ${statusName(error.code)}: ${error.details}`
        : (error.stack ?? String(error));
    process.stderr.write(`scenario failed: ${detail}\n`);
    return 1;
  }
}

process.exitCode = await main(process.argv.slice(2));
