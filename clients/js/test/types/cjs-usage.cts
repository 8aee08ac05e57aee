// Compiled (not run) by types.test.mjs: the same declarations through `require`.

import orderpush = require('orderpush-client');

const client = new orderpush.OrderpushClient({ url: 'ws://127.0.0.1:9011', tenant: 'kitchen', key: 'pos_x' });
client.on('new_order', (order: orderpush.NewOrderEvent) => client.ack(order.id));
const position: number | null = client.position;
void position;
// @ts-expect-error position is read-only
client.position = 3;
