// stompjs in Node over WebSocket (the ws package), for test_js.py: subscribe to a queue with
// client-individual acks, send three messages, NACK one once, ACK the rest, then say goodbye on
// /topic/QUEUE; print what it saw.
import { Client } from "@stomp/stompjs";
import WebSocket from "ws";

const [url, queue, expected] = process.argv.slice(2);
const seen = { bodies: [], redelivered: 0 };
const client = new Client({
  webSocketFactory: () => new WebSocket(url, ["v10.stomp", "v11.stomp", "v12.stomp"]),
  reconnectDelay: 0,
  heartbeatOutgoing: 200,
  heartbeatIncoming: 200,
  onStompError: (frame) => { console.error("ERROR " + frame.headers.message); process.exit(2); },
});
client.onConnect = () => {
  client.subscribe(`/queue/${queue}`, (message) => {
    const bytes = message.binaryBody;          // a body with a NUL byte is not text
    seen.bodies.push(bytes.includes(0) ? `binary:${bytes.length}` : message.body);
    if (message.headers.redelivered === "true") seen.redelivered++;
    if (message.body === "nack me" && message.headers.redelivered !== "true") message.nack();
    else message.ack();
    if (seen.bodies.length === Number(expected)) {
      client.publish({ destination: `/topic/${queue}`, body: "bye from stompjs" });
      setTimeout(() => client.deactivate().then(() => {
        console.log(JSON.stringify(seen));
        process.exit(0);
      }), 500);                   // a few heart-beats both ways before leaving
    }
  }, { ack: "client-individual" });
  for (const body of ["one", "nack me", "three"]) {
    client.publish({ destination: `/queue/${queue}`, body });
  }
};
client.activate();
setTimeout(() => { console.error("timeout " + JSON.stringify(seen)); process.exit(3); }, 15000);
