// Live order status: poll the JSON API until the order settles, no page reload.
(function () {
  "use strict";
  const box = document.getElementById("order-status");
  if (!box) return;
  const url = box.dataset.statusUrl;
  const field = (name) => box.querySelector('[data-field="' + name + '"]');
  const step = (name) => box.querySelector('[data-step="' + name + '"]');
  let delay = 1000;

  function render(data) {
    const paid = data.status === "paid";
    const cancelled = data.status === "cancelled";
    const failed = data.status === "failed" || cancelled;
    field("status").textContent = data.status_display;
    field("payment").textContent = paid
      ? "Paid"
      : cancelled
        ? "Cancelled"
        : failed
          ? "Payment failed"
          : "Payment pending";
    step("paid").className = paid ? "done" : failed ? "failed" : "";
    const sent = data.receipt.status === "sent";
    const abandoned = data.receipt.status === "abandoned"; // the shop gave up on the mail
    field("receipt").textContent = sent
      ? "Receipt sent"
      : abandoned
        ? "Receipt not sent"
        : "Receipt not sent yet";
    step("receipt").className = sent ? "done" : "";
    const problem = field("problem");
    problem.textContent = data.payment.message || "";
    problem.hidden = !data.payment.message;
    return failed || sent || abandoned;
  }

  async function poll() {
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" } });
      if (response.ok && render(await response.json())) return; // settled: stop polling
      delay = 1000;
    } catch (error) {
      delay = Math.min(delay * 2, 10000); // server unreachable: back off, keep trying
    }
    window.setTimeout(poll, delay);
  }
  window.setTimeout(poll, 500);
})();
