// A small sorter on node-opcua (not asyncua): edge-agent's OPC UA interoperability test
// reads and subscribes to it. Usage: node opcua_server.js PORT
// Namespace urn:acme:node-sorter; Objects/Sorter2/{Count (UInt32), TrackingId (String),
// Lane (Int32)}; every 200 ms a carton is diverted: TrackingId and Lane are written, then
// Count, as a PLC-backed server updates a divert record (values pushed, not sampled).
const { OPCUAServer } = require("node-opcua-server");
const { Variant, DataType } = require("node-opcua-variant");  // a dependency of the server

async function main() {
  const port = parseInt(process.argv[2], 10);
  const server = new OPCUAServer({ port, resourcePath: "/", allowAnonymous: true });
  await server.initialize();
  const space = server.engine.addressSpace;
  const ns = space.registerNamespace("urn:acme:node-sorter");
  const sorter = ns.addObject({ organizedBy: space.rootFolder.objects, browseName: "Sorter2" });
  const v = (name, dataType, value) => ns.addVariable({
    componentOf: sorter, browseName: name, nodeId: `s=Sorter2.${name}`, dataType,
    value: new Variant({ dataType, value }),
  });
  const trackingId = v("TrackingId", DataType.String, "");
  const lane = v("Lane", DataType.Int32, -1);
  const count = v("Count", DataType.UInt32, 0);
  await server.start();
  console.log(`READY endpoint=${server.getEndpointUrl()}`);
  let n = 0;
  setInterval(() => {
    n += 1;
    trackingId.setValueFromSource(new Variant({ dataType: DataType.String, value: "N" + String(n).padStart(7, "0") }));
    lane.setValueFromSource(new Variant({ dataType: DataType.Int32, value: 1 + (n % 12) }));
    count.setValueFromSource(new Variant({ dataType: DataType.UInt32, value: n }));
  }, 200);
  const stop = async () => { await server.shutdown(100); process.exit(0); };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}
main().catch((err) => { console.error(err); process.exit(1); });
