// Compiled (not run) by types.test.mjs: the declarations, imported as an ES module, give a POS
// app precise types, and reject wrong use.

import { OrderpushClient, isKnownFrame, type KnownFrame, type ServerFrame, type StopInfo } from 'orderpush-client';

declare function print(lines: string[]): Promise<void>;
declare function upsert(orderId: string, status: string): void;

const client = new OrderpushClient({ url: 'ws://127.0.0.1:9011', tenant: 'kitchen', key: 'pos_x', types: ['new_order'] });

client.on('new_order', async (order) => {
  const lines: string[] = order.data.items.map((i) => `${i.quantity} x ${i.name} ${i.price.toFixed(2)}`);
  await print(lines);
  client.ack(order.id);
});
client.on('order_snapshot', (o) => upsert(o.data.orderId, o.data.status));
client.on('order_updated', (u) => upsert(u.data.orderId, u.data.status));
client.on('gift_card_purchased', (g) => void g.data.cardNumber.toUpperCase());
client.on('loyalty_updated', (l) => void (l.data.newBalance + l.data.pointsChange));
client.on('resync_required', (r) => void (r.data.reason === 'log_rewound'));
client.on('snapshot_end', (e) => void (e.complete === true));
client.on('ready', (e) => void e.id.toFixed());
client.on('broadcast', (b) => void JSON.stringify(b.data));
client.on('error', (e) => void [e.kind, e.status, e.message]);
client.on('stopped', (s: StopInfo) => void (s.needsHuman && s.reason !== 'closed'));

client.on('frame', (frame: ServerFrame) => {
  if (!isKnownFrame(frame)) return;
  const known: KnownFrame = frame;
  switch (known.type) {
    case 'new_order':
      void known.data.orderNumber;
      break;
    case 'snapshot_end':
      void known.complete;
      break;
    case 'gift_card_purchased':
      // @ts-expect-error a gift card has no orderNumber
      void known.data.orderNumber;
      break;
  }
});

// @ts-expect-error new_order data has no cardNumber
client.on('new_order', (o) => void o.data.cardNumber);
// @ts-expect-error no such event
client.on('new_orders', () => {});
// @ts-expect-error ack takes an id
client.ack('7');
// @ts-expect-error snapshot is 'open' or false
new OrderpushClient({ url: 'ws://h', tenant: 'k', key: 'pos_x', snapshot: 'all' });

const stopped: Promise<StopInfo> = client.start().whenStopped();
void stopped;
