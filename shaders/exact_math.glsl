/*
 * Correctly rounded float division in integer arithmetic. GPUs may divide
 * with 2.5 ulp of error; the reference quantizer (src/quant.c) divides in
 * C, correctly rounded, and every INT8 code depends on the quotient.
 * a, b > 0 and finite (either may be subnormal). Result normal or +inf;
 * quotients below FLT_MIN flush toward zero (never reached by qattn: the
 * operands are 127 and an amax).
 */
float div_rn(float a, float b)
{
    uint ua = floatBitsToUint(a), ub = floatBitsToUint(b);
    int ea = int(ua >> 23), eb = int(ub >> 23);
    uint ma = ua & 0x7fffffu, mb = ub & 0x7fffffu;
    if (ea == 0) { int s = 23 - findMSB(ma); ma <<= uint(s); ea = 1 - s; } else ma |= 0x800000u;
    if (eb == 0) { int s = 23 - findMSB(mb); mb <<= uint(s); eb = 1 - s; } else mb |= 0x800000u;
    int e = ea - eb + 127;
    if (ma < mb) { ma <<= 1; e -= 1; }
    /* ma / mb in [1, 2): 24 significant quotient bits and a round bit */
    uint q = 0u, r = ma;
    for (int i = 0; i < 25; i++) {
        q <<= 1;
        if (r >= mb) { r -= mb; q |= 1u; }
        r <<= 1;
    }
    uint mant = q >> 1;
    if ((q & 1u) != 0u && (r != 0u || (mant & 1u) != 0u))
        mant += 1u;
    if (mant == 0x1000000u) { mant >>= 1; e += 1; }
    if (e >= 255) return uintBitsToFloat(0x7f800000u);
    if (e <= 0) return 0.0;
    return uintBitsToFloat((uint(e) << 23) | (mant & 0x7fffffu));
}
